from setuptools import find_packages, setup

setup(
    name="smtpguard",
    version="0.1.0",
    description="An SMTP antivirus-scanning proxy built on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=[*find_packages(include=["smtpguard", "smtpguard.*"]), "twisted.plugins"],
    package_data={"smtpguard": ["py.typed"], "twisted": ["plugins/smtpguard_plugin.py"]},
    install_requires=[
        "twisted[tls]>=24.7",
        "zope.interface>=6",
        "attrs>=23.1",
        "service-identity>=24.1",
        "pyOpenSSL>=24",
        "idna>=3.7",  # IDNA 2008 for EHLO names; Twisted already depends on it
        "prometheus_client>=0.20",  # /metrics: the exposition format, kept by Prometheus
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-twisted>=1.14", "hypothesis>=6", "setuptools>=70.1", "wheel"],
        "dev": ["mypy>=1.10", "mypy-zope>=1.0", "ruff>=0.5"],
    },
    entry_points={"console_scripts": ["smtpguard = smtpguard.cli:main"]},
    classifiers=["Framework :: Twisted", "Topic :: Communications :: Email :: Filters"],
)
