from twisted.application.service import ServiceMaker

smtpguard = ServiceMaker("smtpguard", "smtpguard.tap", "SMTP antivirus-scanning proxy", "smtpguard")
