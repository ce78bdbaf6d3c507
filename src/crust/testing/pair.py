"""Two sessions wired back to back in memory, with a fake clock (no sockets, no asyncio)."""

from __future__ import annotations

from collections.abc import Callable

from crust.events import MessageReceived
from crust.identity import Identity, PeerId
from crust.proto.session import Session, SessionEvent, SessionParams


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def make_params(network: str = "crust", **kw: object) -> SessionParams:
    return SessionParams(identity=Identity.generate(), network_name=network, **kw)  # type: ignore[arg-type]


class SessionPair:
    """An initiator ``a`` and a responder ``b``; :meth:`pump` moves bytes until quiet.

    ``chunker`` can split every write into pieces (to test arbitrary stream boundaries);
    ``wire_a_to_b`` / ``wire_b_to_a`` can tamper with or drop bytes in flight.
    """

    def __init__(
        self,
        params_a: SessionParams | None = None,
        params_b: SessionParams | None = None,
        *,
        clock: FakeClock | None = None,
        expected_peer: PeerId | None = None,
        chunker: Callable[[bytes], list[bytes]] | None = None,
    ) -> None:
        self.clock = clock or FakeClock()
        self.params_a = params_a or make_params()
        self.params_b = params_b or make_params()
        self.a = Session(
            self.params_a, initiator=True, now=self.clock.now, expected_peer=expected_peer
        )
        self.b = Session(self.params_b, initiator=False, now=self.clock.now)
        self.events_a: list[SessionEvent] = []
        self.events_b: list[SessionEvent] = []
        self.chunker = chunker
        self.wire_a_to_b: Callable[[bytes], bytes] = lambda d: d
        self.wire_b_to_a: Callable[[bytes], bytes] = lambda d: d
        self.connected = True

    def pump(self, max_rounds: int = 10_000) -> None:
        for _ in range(max_rounds):
            moved = self._move(self.a, self.b, self.wire_a_to_b)
            moved |= self._move(self.b, self.a, self.wire_b_to_a)
            self.events_a.extend(self._drain(self.a))
            self.events_b.extend(self._drain(self.b))
            if not moved:
                return
        raise AssertionError("pump did not settle")

    def _move(self, src: Session, dst: Session, wire: Callable[[bytes], bytes]) -> bool:
        chunks = src.data_to_send()
        if not chunks:
            return False
        data = wire(b"".join(chunks))
        if self.connected and data:
            for piece in self.chunker(data) if self.chunker else [data]:
                dst.receive_data(piece, self.clock.now)
        return True

    @staticmethod
    def _drain(s: Session) -> list[SessionEvent]:
        out = list(s.events)
        s.events.clear()
        return out

    def tick(self, seconds: float) -> None:
        """Advance the clock, fire due timers on both sides, and pump."""
        self.clock.advance(seconds)
        for s in (self.a, self.b):
            t = s.get_timer()
            if t is not None and t <= self.clock.now:
                s.handle_timer(self.clock.now)
        self.pump()

    def messages_b(self) -> list[MessageReceived]:
        return [e for e in self.events_b if isinstance(e, MessageReceived)]

    def messages_a(self) -> list[MessageReceived]:
        return [e for e in self.events_a if isinstance(e, MessageReceived)]
