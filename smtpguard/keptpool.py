"""Idle connections kept between uses, whatever their protocol: the next use skips
the connect (and whatever set-up the protocol does) of its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime

P = TypeVar("P")


def _any(protocol: object) -> bool:
    return True


class Kept(Generic[P]):
    """At most ``size`` idle protocols, each kept for at most ``idle_time`` seconds;
    the most recently given is taken first, so a quiet spell lets the others expire.

    ``usable`` says whether a protocol may be kept or handed out; ``let_go`` ends
    one the pool does not keep (unusable, surplus, expired, or the pool closed);
    ``gone`` fires once its connection is closed.  ``watch``, if given, is handed
    what to call should the connection close while it is kept (so that it is
    forgotten), and None once it is not kept any more.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        size: int,
        idle_time: float,
        *,
        usable: Callable[[P], bool],
        let_go: Callable[[P], None],
        gone: Callable[[P], Deferred[None]],
        watch: Callable[[P, Callable[[P], None] | None], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._size = size
        self._idle_time = idle_time
        self._usable = usable
        self._let_go = let_go
        self._gone = gone
        self._watch = watch
        self._kept: list[tuple[P, IDelayedCall]] = []
        self._closed = False

    def __len__(self) -> int:
        return len(self._kept)

    def take(self, fits: Callable[[P], bool] = _any) -> P | None:
        """The most recently given protocol that is still usable and ``fits``, or
        None; the ones passed over are let go."""
        while self._kept:
            protocol = self._remove(len(self._kept) - 1)
            if self._usable(protocol) and fits(protocol):
                return protocol
            self._let_go(protocol)
        return None

    def give(self, protocol: P) -> None:
        """Keep ``protocol`` for a later :meth:`take`, or let it go: it is not usable,
        ``size`` are kept already, or the pool is closed."""
        if self._closed or len(self._kept) >= self._size or not self._usable(protocol):
            self._let_go(protocol)
            return
        self._kept.append((protocol, self._reactor.callLater(self._idle_time, self._expire, protocol)))
        if self._watch is not None:
            self._watch(protocol, self._forget)

    def empty(self) -> Deferred[None]:
        """Let every kept protocol go (the pool keeps the ones given later); fires
        once they are all gone."""
        kept = [self._remove(0) for _ in range(len(self._kept))]
        for protocol in kept:
            self._let_go(protocol)
        return gatherResults([self._gone(protocol) for protocol in kept]).addCallback(lambda _: None)

    def close(self) -> Deferred[None]:
        """Let every kept protocol go, and each one given later; fires once the
        kept ones are all gone."""
        self._closed = True
        return self.empty()

    def _remove(self, index: int) -> P:
        protocol, expiry = self._kept.pop(index)
        if expiry.active():
            expiry.cancel()
        if self._watch is not None:
            self._watch(protocol, None)
        return protocol

    def _index(self, protocol: P) -> int | None:
        return next((index for index, (kept, _) in enumerate(self._kept) if kept is protocol), None)

    def _forget(self, protocol: P) -> None:
        index = self._index(protocol)
        if index is not None:
            self._remove(index)

    def _expire(self, protocol: P) -> None:
        index = self._index(protocol)
        if index is not None:
            self._let_go(self._remove(index))
