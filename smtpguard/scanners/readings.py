"""The ways a message's header sections can be read: as the RFCs and Python's email
package read them, and as mail clients do where that differs.  The MIME splitter
reads a message one way at a time; the walk reads it again each way that would
change a part's type, encoding, boundary or file name."""

from __future__ import annotations

import enum
from collections.abc import Hashable

import attrs


class HeaderEnd(enum.Enum):
    """Where a header section ends, and what happens to a line in it that is not a field."""

    # At the first line that is not a field, which starts the body (email.feedparser).
    FIRST_OTHER_LINE = "first other line"
    # At the empty line; lines that are not fields are skipped (Thunderbird's libmime).
    EMPTY_LINE_SKIPPING = "empty line, skipping"
    # At the empty line; fields after the first line that is not one are dropped
    # (MIME-tools, through Mail::Header).
    EMPTY_LINE_STOPPING = "empty line, stopping"


class Repeated(enum.Enum):
    """Which of repeated Content-Type, Content-Transfer-Encoding or Content-Disposition
    fields counts."""

    FIRST = "first"
    LAST = "last"


class Parameters(enum.Enum):
    """Which value of a parameter given more than once counts (``boundary``, ``name``,
    ``filename``): the plain form (``name=``) or the RFC 2231 one (``name*=``,
    ``name*0=``), and the first or the last of repeated plain ones."""

    # RFC 2231 form first, else the first plain one: Thunderbird, Outlook-like readers.
    STANDARD = "standard"
    # RFC 2231 form first, else the last plain one: MIME-tools.
    LAST = "last"
    # The first plain one, else the RFC 2231 form: the email package's compat32 policy.
    PLAIN = "plain"


@attrs.frozen
class Reading:
    """One way of reading header sections (see the enums), whether a field's name may
    be followed by blanks before its colon (``loose_names``, RFC 5322 section 4.5's
    obsolete syntax), and whether a multipart's close delimiter ends it even where a
    separator of the same boundary comes after it (``close_ends``)."""

    name: str
    header_end: HeaderEnd
    loose_names: bool
    repeated: Repeated
    parameters: Parameters
    close_ends: bool


RFC = Reading("rfc", HeaderEnd.FIRST_OTHER_LINE, False, Repeated.FIRST, Parameters.STANDARD, True)
CLIENT = Reading("client", HeaderEnd.EMPTY_LINE_SKIPPING, True, Repeated.FIRST, Parameters.STANDARD, False)
MIME_TOOLS = Reading("mime-tools", HeaderEnd.EMPTY_LINE_STOPPING, False, Repeated.FIRST, Parameters.LAST, True)
# The email package itself (its compat32 policy, which its feed parser splits with):
# RFC but for parameters given both plain and in RFC 2231 form.
EMAIL_PACKAGE = Reading("email-package", HeaderEnd.FIRST_OTHER_LINE, False, Repeated.FIRST, Parameters.PLAIN, True)
LAST_FIELDS = Reading("last-fields", HeaderEnd.EMPTY_LINE_SKIPPING, True, Repeated.LAST, Parameters.LAST, False)

# In the order the walk tries them; RFC always, the others where a message needs them.
READINGS = (RFC, CLIENT, MIME_TOOLS, EMAIL_PACKAGE, LAST_FIELDS)

# What calls for which readings besides the one in use:
# a line in a header section that is not a field (blanks before a colon included);
OTHER_LINE = frozenset({CLIENT, MIME_TOOLS})
# repeated decisive fields with different values;
REPEATED_FIELDS = frozenset({LAST_FIELDS})
# a boundary or file name that the last of its plain values, or its plain value, changes;
LAST_PARAMETER = frozenset({MIME_TOOLS, LAST_FIELDS})
PLAIN_PARAMETER = frozenset({EMAIL_PACKAGE})
# a separator after the close delimiter of the same multipart.
SEPARATOR_AFTER_CLOSE = frozenset({CLIENT, LAST_FIELDS})


class Readings:
    """The readings one message is walked with: RFC first, then each other that some
    header of the message needs.  Once there is more than one, the walk ``tracking``
    tells :meth:`seen` what it looks at, so that a file an earlier reading found the
    same is neither looked at nor counted again."""

    def __init__(self, base: int) -> None:
        self.base = base  # the parts the walk had counted before this message
        self._readings = [RFC]  # walked, being walked and to walk, in that order
        self._at = -1
        self._seen: set[Hashable] | None = None

    @property
    def reading(self) -> Reading:
        return self._readings[self._at]

    @property
    def again(self) -> bool:
        """Whether an earlier reading was walked."""
        return self._at > 0

    @property
    def pending(self) -> bool:
        """Whether a reading is left to walk after this one."""
        return self._at + 1 < len(self._readings)

    @property
    def tracking(self) -> bool:
        return self._seen is not None

    def next(self) -> bool:
        """Move on to the next reading: False when there is none left."""
        self._at += 1
        return self._at < len(self._readings)

    def add(self, readings: frozenset[Reading]) -> None:
        """Walk these readings too, unless walked already (in :data:`READINGS`' order)."""
        self._readings += [reading for reading in READINGS if reading in readings and reading not in self._readings]
        if self.pending and self._seen is None:
            self._seen = set()

    def seen(self, key: Hashable) -> bool:
        """Whether an earlier reading looked at what ``key`` stands for."""
        if self._seen is None:
            return False
        if key in self._seen:
            return self.again
        self._seen.add(key)
        return False
