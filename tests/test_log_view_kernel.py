"""LogView in a real kernel: what following a long log sends to the browser, and what a
view that comes later (a second view, a reopened notebook) gets.

Each flush sent the whole tail kept (up to 200,000 characters) as the ``text`` state,
four times a second while a training log grew: the cost of an update was the log's,
not the new lines'.
"""

from __future__ import annotations

import pytest

from .log_view_comms import Frontend, LogKernel, follow

MAX_CHARS = 50_000


@pytest.fixture
def kernel(tmp_path):
    started = LogKernel(tmp_path)
    yield started
    started.close()


def test_following_a_long_log_sends_only_what_is_new(kernel):
    model_id, length, traffic = follow(kernel, lines=4000, flush=0.05, max_chars=MAX_CHARS)
    in_kernel = kernel.run("print(view.text, end='')")
    assert length == len(in_kernel) == MAX_CHARS  # the log was longer: its tail is kept

    # The browser's copy, from the messages alone, is the kernel's text, emoji and all.
    view = traffic.frontend()
    assert view.resyncs == 0 and view.text == in_kernel
    assert "\U0001f3c3" in view.text

    # Each update is about what one flush added, never the tail again.
    sizes = traffic.updates()
    assert len(sizes) >= 10, sizes
    log_bytes = 4000 * 110
    assert max(sizes) < MAX_CHARS / 4, sizes
    assert sum(sizes) < 1.5 * log_bytes, (sum(sizes), len(sizes))

    # A view that asks for the state later (a second browser tab, a reload) gets all
    # of it; so does a view that lost its place.
    before = len(kernel.traffic(model_id).messages)
    kernel.to_widget(model_id, {"method": "request_state"})
    kernel.to_widget(model_id, {"method": "custom", "content": {"type": "resync"}})
    kernel.drain(2)
    answers = [
        data["state"]
        for _, _, data in kernel.traffic(model_id).messages[before:]
        if "text" in data.get("state", {})
    ]
    assert len(answers) == 2, answers
    for state in answers:
        late = Frontend()
        late.update(state)
        assert late.text == in_kernel and late.end == view.end


def test_a_view_that_missed_an_append_asks_again_rather_than_showing_a_gap():
    view = Frontend(text="ab", end=2)
    view.custom({"type": "append", "after": 5, "end": 7, "drop": 0, "text": "xy"})
    assert view.resyncs == 1 and view.text == "ab"
    view.custom({"type": "append", "after": 0, "end": 2, "drop": 0, "text": "ab"})
    assert view.text == "ab"  # already there: the state it got held it
