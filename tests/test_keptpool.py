"""The pool of idle connections kept between uses (next-hop SMTP connections and
clamd sessions share it), driven by a Clock with protocols that record what the
pool does to them."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from smtpguard.keptpool import Kept
from tests.test_layers import import_alone

IDLE_TIME = 5.0


class Connection:
    """A protocol as the pool sees it: usable or not, let go at most once, gone
    when its connection closes; it refuses to be kept or handed out once let go."""

    def __init__(self, name: str, usable: bool = True) -> None:
        self.name = name
        self.usable = usable
        self.let_go = False
        self.gone: Deferred[None] = Deferred()
        self.watcher: Callable[[Connection], None] | None = None

    def __repr__(self) -> str:
        return f"Connection({self.name!r})"

    def release(self) -> None:
        assert not self.let_go, f"{self.name} let go twice"
        self.let_go = True

    def close(self) -> None:
        """The connection closes (after being let go, or the server closing it)."""
        self.usable = False
        self.gone.callback(None)
        if self.watcher is not None:
            self.watcher(self)


def _usable(connection: Connection) -> bool:
    assert not connection.let_go, f"{connection.name} asked after it was let go"
    return connection.usable


def _watch(connection: Connection, told: Callable[[Connection], None] | None) -> None:
    connection.watcher = told


def pool(size: int = 3, watched: bool = False) -> tuple[Kept[Connection], Clock]:
    clock = Clock()
    kept: Kept[Connection] = Kept(
        clock,
        size,
        IDLE_TIME,
        usable=_usable,
        let_go=Connection.release,
        gone=lambda connection: connection.gone,
        watch=_watch if watched else None,
    )
    return kept, clock


def test_a_given_connection_is_taken_back_once():
    """A connection given is what the next take hands out, and the pool is then empty."""
    kept, clock = pool()
    one = Connection("one")
    kept.give(one)
    assert (len(kept), kept.take(), len(kept), kept.take()) == (1, one, 0, None)
    assert (one.let_go, clock.getDelayedCalls()) == (False, [])


def test_take_hands_out_the_most_recently_given_first():
    """Of three kept connections, take hands out the last given, then the one before."""
    kept, _ = pool()
    first, second, third = Connection("first"), Connection("second"), Connection("third")
    for connection in (first, second, third):
        kept.give(connection)
    assert [kept.take(), kept.take(), kept.take()] == [third, second, first]


def test_a_kept_connection_is_let_go_after_idle_time():
    """A connection not taken for ``idle_time`` seconds is let go and leaves the pool;
    a moment earlier it is still kept."""
    kept, clock = pool()
    one = Connection("one")
    kept.give(one)
    clock.advance(IDLE_TIME - 0.001)
    assert (one.let_go, len(kept)) == (False, 1)
    clock.advance(0.001)
    assert (one.let_go, len(kept), clock.getDelayedCalls()) == (True, 0, [])


def test_each_connection_expires_idle_time_after_it_was_given():
    """Connections given at different times expire each ``idle_time`` after its own give."""
    kept, clock = pool()
    early, late = Connection("early"), Connection("late")
    kept.give(early)
    clock.advance(2.0)
    kept.give(late)
    clock.advance(IDLE_TIME - 2.0)
    assert (early.let_go, late.let_go, len(kept)) == (True, False, 1)
    clock.advance(2.0)
    assert (late.let_go, len(kept)) == (True, 0)


def test_a_connection_given_back_again_gets_a_new_idle_time():
    """Taking a connection stops its expiry; given back, its idle time starts afresh."""
    kept, clock = pool()
    one = Connection("one")
    kept.give(one)
    clock.advance(4.0)
    assert kept.take() is one
    kept.give(one)
    clock.advance(4.0)
    assert (one.let_go, len(kept), [call.getTime() for call in clock.getDelayedCalls()]) == (False, 1, [9.0])


def test_at_most_size_are_kept_and_the_surplus_is_let_go():
    """With ``size`` 2, a third connection given is let go at once; the two are kept."""
    kept, _ = pool(size=2)
    connections = [Connection(str(number)) for number in range(3)]
    for connection in connections:
        kept.give(connection)
    assert ([connection.let_go for connection in connections], len(kept)) == ([False, False, True], 2)


def test_size_zero_keeps_nothing():
    """A pool of size 0 lets every connection given go, and starts no timer."""
    kept, clock = pool(size=0)
    one = Connection("one")
    kept.give(one)
    assert (one.let_go, len(kept), clock.getDelayedCalls()) == (True, 0, [])


def test_an_unusable_connection_given_is_let_go():
    """A connection that is not usable is let go instead of kept."""
    kept, clock = pool()
    busy = Connection("busy", usable=False)
    kept.give(busy)
    assert (busy.let_go, len(kept), clock.getDelayedCalls()) == (True, 0, [])


def test_take_lets_go_of_the_connections_that_became_unusable():
    """Take passes over (and lets go) the recent connections no longer usable and
    hands out the most recent one that is."""
    kept, clock = pool()
    older, newer = Connection("older"), Connection("newer")
    kept.give(older)
    kept.give(newer)
    newer.usable = False
    assert (kept.take(), newer.let_go, older.let_go) == (older, True, False)
    assert (len(kept), clock.getDelayedCalls()) == (0, [])


def test_take_lets_go_of_a_connection_that_does_not_fit():
    """A usable connection that does not fit what the taker asks is let go, not handed out."""
    kept, _ = pool()
    plain = Connection("plain")
    kept.give(plain)
    assert (kept.take(lambda connection: connection.name == "tls"), plain.let_go, len(kept)) == (None, True, 0)


def test_close_fires_once_every_kept_connection_is_gone():
    """Close lets every kept connection go at once, and fires only after the last is gone."""
    kept, clock = pool()
    first, second = Connection("first"), Connection("second")
    kept.give(first)
    kept.give(second)
    closed: list[None] = []
    kept.close().addCallback(closed.append)
    assert (first.let_go, second.let_go, len(kept), clock.getDelayedCalls()) == (True, True, 0, [])
    first.close()
    assert closed == []
    second.close()
    assert closed == [None]


def test_close_with_nothing_kept_fires_at_once():
    """Closing an empty pool fires at once."""
    kept, _ = pool()
    closed: list[None] = []
    kept.close().addCallback(closed.append)
    assert closed == [None]


def test_a_connection_given_after_close_is_let_go():
    """Once closed, the pool keeps nothing: a connection given back is let go at once."""
    kept, clock = pool()
    kept.close()
    late = Connection("late")
    kept.give(late)
    assert (late.let_go, len(kept), clock.getDelayedCalls()) == (True, 0, [])


def test_empty_lets_go_of_the_kept_and_keeps_the_ones_given_later():
    """Emptying lets the kept connections go and fires once they are gone; unlike
    close, the pool keeps the connections given afterwards."""
    kept, _ = pool()
    old, new = Connection("old"), Connection("new")
    kept.give(old)
    emptied: list[None] = []
    kept.empty().addCallback(emptied.append)
    old.close()
    kept.give(new)
    assert (old.let_go, emptied, new.let_go, kept.take()) == (True, [None], False, new)


def test_a_watched_connection_that_closes_while_kept_is_forgotten():
    """A connection whose server closes it while kept leaves the pool (its timer
    with it) without being let go, and is not handed out."""
    kept, clock = pool(watched=True)
    older, closing = Connection("older"), Connection("closing")
    kept.give(older)
    kept.give(closing)
    closing.close()
    assert (len(kept), closing.let_go, len(clock.getDelayedCalls())) == (1, False, 1)
    assert kept.take() is older


def test_a_connection_is_watched_only_while_kept():
    """The pool asks to be told of a close while a connection is kept, and stops
    asking once it is taken, expired or let go by close."""
    kept, clock = pool(watched=True)
    taken, expired, closed = Connection("taken"), Connection("expired"), Connection("closed")
    kept.give(taken)
    assert taken.watcher is not None
    assert kept.take() is taken
    assert taken.watcher is None
    kept.give(expired)
    clock.advance(IDLE_TIME)
    assert (expired.watcher, expired.let_go) == (None, True)
    kept.give(closed)
    kept.close()
    assert (closed.watcher, closed.let_go) == (None, True)


def test_the_pool_module_imports_nothing_of_smtpguard():
    """The pool serves the next-hop client and the scanners alike, so it brings in no
    smtpguard module: importing it alone loads only the package itself."""
    done = import_alone("smtpguard.keptpool")
    assert (done.returncode, done.stdout.decode().strip()) == (0, '["smtpguard", "smtpguard.keptpool"]')
