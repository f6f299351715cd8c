"""Matching the ``omni/ask`` action to the model's reply (pure Python: unit-testable without ROS).

An Ask goal injects text and waits for "the next turn": the first turn whose ``turn_id`` is larger
than every turn id seen when the goal was opened (a turn already in progress is someone else's
reply). The waiter collects that turn's text deltas until ``end_of_turn``. The tracker is fed from
the Omni-Flow worker thread and read from action-server threads, hence the condition variable.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from omni_ros.core.types import SpeechOut, TextOut


class AskWaiter:
    """One goal's view of the reply; read it under :attr:`AskTracker.condition`."""

    def __init__(self, after_turn_id: int) -> None:
        self.after_turn_id = after_turn_id
        self.turn_id: int | None = None
        self.text = ""
        self.done = False
        self.spoken = False


class AskTracker:
    """Routes ``TextOut`` / ``SpeechOut`` events to the open :class:`AskWaiter` s."""

    def __init__(self, remember_turns: int = 64) -> None:
        self.condition = threading.Condition()
        self._last_turn_id = 0
        self._waiters: list[AskWaiter] = []
        self._spoken: deque[int] = deque(maxlen=remember_turns)

    def open(self) -> AskWaiter:
        """Start waiting for the next turn (call BEFORE injecting the text, so no reply is missed)."""
        with self.condition:
            waiter = AskWaiter(self._last_turn_id)
            self._waiters.append(waiter)
            return waiter

    def close(self, waiter: AskWaiter) -> None:
        """Stop routing events to ``waiter`` (finished, cancelled or timed out)."""
        with self.condition:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def on_text(self, event: TextOut) -> None:
        with self.condition:
            self._last_turn_id = max(self._last_turn_id, event.turn_id)
            for waiter in self._waiters:
                if waiter.done:
                    continue
                if waiter.turn_id is None and event.turn_id > waiter.after_turn_id:
                    waiter.turn_id = event.turn_id
                if waiter.turn_id == event.turn_id:
                    waiter.text += event.text
                    waiter.spoken = waiter.spoken or event.turn_id in self._spoken
                    waiter.done = event.end_of_turn
            self.condition.notify_all()

    def on_speech(self, event: SpeechOut) -> None:
        with self.condition:
            self._last_turn_id = max(self._last_turn_id, event.turn_id)
            if event.turn_id not in self._spoken:
                self._spoken.append(event.turn_id)
            for waiter in self._waiters:
                if waiter.turn_id == event.turn_id:
                    waiter.spoken = True
            self.condition.notify_all()

    def wait(
        self,
        waiter: AskWaiter,
        timeout_s: float,
        should_stop: Callable[[], bool],
        on_partial: Callable[[str], None],
        poll_s: float = 0.05,
    ) -> tuple[str, bool, bool]:
        """Block until ``waiter``'s turn ends, ``timeout_s`` passes or ``should_stop()`` (a cancel);
        ``on_partial(text)`` is called whenever the reply grew. Closes the waiter.

        Returns:
            ``(reply, spoken, done)``; ``done`` is False on timeout or stop.
        """
        deadline, sent = time.monotonic() + timeout_s, ""
        with self.condition:
            while not waiter.done and time.monotonic() < deadline and not should_stop():
                if waiter.text != sent:
                    sent = waiter.text
                    on_partial(sent)
                self.condition.wait(poll_s)
            result = (waiter.text, waiter.spoken, waiter.done)
        self.close(waiter)
        return result
