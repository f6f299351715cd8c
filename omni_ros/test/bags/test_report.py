"""summary.json and timeline.png from hand-written output bags: every number checked against the truth."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bag_samples import short_config
from omni_ros.core.clock import NS_PER_S
from omni_ros.tools.bagio import InputBag, OutputBag
from omni_ros.tools.report import plot_timeline, summarize
from omni_ros.tools.synth import write_bag
from omni_ros.tools.typestore import omni_typestore

STORE = omni_typestore()
START_NS = int(short_config().start_s * NS_PER_S)  # stamp of the first microphone sample
UNIT0_END_NS = START_NS + 1_035_000_000  # MiniCPM-o's first unit is 1.035 s, later ones 1 s


def _msg(type_name: str, **values: Any) -> Any:
    """A rosbags message with every field not given at its zero value (fields may be added)."""
    cls = STORE.types[type_name]
    for f in dataclasses.fields(cls):
        if f.name in values or str(f.type).startswith("ClassVar"):
            continue
        kind = str(f.type)
        if kind.endswith("Header"):
            values[f.name] = _header(0)
        elif kind.endswith("Time"):
            values[f.name] = _time(0)
        elif kind.startswith("np.ndarray"):
            values[f.name] = np.zeros(0, np.uint8)
        elif kind.startswith("list"):
            values[f.name] = []
        else:
            values[f.name] = {"int": 0, "float": 0.0, "bool": False, "str": ""}[kind]
    return cls(**values)


def _time(ns: int) -> Any:
    return STORE.types["builtin_interfaces/msg/Time"](sec=ns // NS_PER_S, nanosec=ns % NS_PER_S)


def _header(ns: int) -> Any:
    return STORE.types["std_msgs/msg/Header"](stamp=_time(ns), frame_id="")


def unit_end(k: int) -> int:
    return UNIT0_END_NS + k * NS_PER_S


class Outputs:
    """Writes an output bag the way the node's topics would be recorded (log = receive time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bag = OutputBag(path)

    def state(self, log_ns: int, stamp_ns: int, index: int, mode: int = 0, gap: int = 0) -> None:
        self.bag.write(
            "/omni/state",
            "omni_ros_msgs/msg/OmniState",
            log_ns,
            _msg(
                "omni_ros_msgs/msg/OmniState",
                header=_header(stamp_ns),
                mode=mode,
                unit_index=index,
                unit_compute_ms=10.0,
                gap_samples_filled=gap,
                backend="reference",
            ),
        )

    def speech(self, log_ns: int, stamp_ns: int, chunks: int = 10, **extra: Any) -> None:
        """One unit of speech in 100 ms chunks (speech.chunk_ms), as the node publishes it."""
        pcm = (np.full(2_400, 0.1) * 32767).astype("<i2").tobytes()
        for k in range(chunks):
            self.bag.write(
                "/omni/speech",
                "omni_ros_msgs/msg/AudioChunk",
                log_ns,
                _msg(
                    "omni_ros_msgs/msg/AudioChunk",
                    header=_header(stamp_ns + k * 100_000_000),
                    sample_rate=24_000,
                    channels=1,
                    encoding="S16LE",
                    data=np.frombuffer(pcm, np.uint8),
                    **extra,
                ),
            )

    def text(self, log_ns: int, stamp_ns: int, index: int, text: str, end: bool = False) -> None:
        self.bag.write(
            "/omni/text",
            "omni_ros_msgs/msg/OmniText",
            log_ns,
            _msg(
                "omni_ros_msgs/msg/OmniText",
                header=_header(stamp_ns),
                turn_id=1,
                unit_index=index,
                text=text,
                end_of_turn=end,
            ),
        )

    def user_speaking(self, log_ns: int, speaking: bool) -> None:
        self.bag.write(
            "/omni/user_speaking",
            "std_msgs/msg/Bool",
            log_ns,
            _msg("std_msgs/msg/Bool", data=speaking),
        )

    def close(self) -> Path:
        self.bag.close()
        return self.path


@pytest.fixture(scope="module")
def silent_bag(tmp_path_factory: pytest.TempPathFactory) -> InputBag:
    """5 s of microphone noise (stamped 22 ms before it is logged, like a real driver) and frames."""
    path = tmp_path_factory.mktemp("report") / "silent"
    write_bag(path, short_config(duration_s=5.0, cues=(), width=32, height=24, fps=1.0))
    return InputBag(path)


def _conversation(path: Path) -> Path:
    """Units 0-4; the robot speaks in units 1 and 2 (2 ends the turn, so its state reads LISTENING);
    the user barges in while unit 2's speech plays; the flush state repeats the last unit's index."""
    out = Outputs(path)
    out.user_speaking(START_NS + 100_000_000, True)
    out.user_speaking(START_NS + 900_000_000, False)
    out.state(unit_end(0) + 20_000_000, unit_end(0), 0)
    out.text(unit_end(1) + 19_000_000, unit_end(0), 1, "hello")
    out.speech(unit_end(1) + 20_000_000, unit_end(1) + 200_000_000)
    out.state(unit_end(1) + 21_000_000, unit_end(1), 1, mode=1)
    out.text(unit_end(2) + 19_000_000, unit_end(1), 2, "", end=True)
    out.speech(unit_end(2) + 20_000_000, unit_end(2) + 200_000_000)
    out.state(unit_end(2) + 21_000_000, unit_end(2), 2, mode=0)
    onset = unit_end(2) + 400_000_000
    out.state(onset + 480_000_000, onset, 2, mode=0)  # the flow's flush state, decided 480 ms later
    out.state(unit_end(3) + 20_000_000, unit_end(3), 3)
    out.state(unit_end(4) + 20_000_000, unit_end(4), 4)
    return out.close()


def test_a_flush_state_is_a_flush_event_not_another_unit(
    silent_bag: InputBag, tmp_path: Path
) -> None:
    summary = summarize(silent_bag, _conversation(tmp_path / "out"))
    assert summary["units"] == 5
    assert summary["unit_indices"] == [0, 4]
    assert len(summary["flushes"]) == 1
    flush = summary["flushes"][0]
    assert flush["latency_ms"] == pytest.approx(480.0)
    assert flush["onset_s"] == pytest.approx((unit_end(2) + 400_000_000 - START_NS) / NS_PER_S)
    # The span reaches the end of the speech scheduled when it was decided (unit 2's second).
    assert flush["dropped_s"][1] == pytest.approx(
        (unit_end(2) + 1_200_000_000 - START_NS) / NS_PER_S
    )
    assert summary["barge_in_latency_ms"]["median"] == pytest.approx(480.0)
    # Chunks scheduled from the onset on (0.4-1.2 s into unit 2's second of speech) are cancelled.
    assert summary["speech_seconds_cancelled"] == pytest.approx(0.8)


def test_units_of_a_second_pass_count_although_their_indices_restart(
    silent_bag: InputBag, tmp_path: Path
) -> None:
    out = Outputs(tmp_path / "out")
    for k in range(3):  # a looping bag: the clock jumps back and the timeline restarts at unit 0
        out.state(unit_end(k) + 20_000_000, unit_end(k), k)
    for k in range(3):
        out.state(unit_end(3 + k) + 20_000_000, unit_end(k), k)
    summary = summarize(silent_bag, out.close())
    assert summary["units"] == 6
    assert summary["flushes"] == []


def test_the_unit_that_ends_a_turn_by_speaking_counts_as_speaking(
    silent_bag: InputBag, tmp_path: Path
) -> None:
    summary = summarize(silent_bag, _conversation(tmp_path / "out"))
    assert summary["unit_modes"] == {"LISTENING": 3, "SPEAKING": 2}
    assert summary["unit_modes"]["SPEAKING"] == round(summary["speech_seconds"])
    assert summary["state_modes"] == {"LISTENING": 4, "SPEAKING": 1}


def test_times_are_on_the_bag_axis_and_never_negative(silent_bag: InputBag, tmp_path: Path) -> None:
    # The first sample is stamped before the bag's first log time; unit 0 text starts there.
    assert silent_bag.start_ns > START_NS
    out = Outputs(tmp_path / "out")
    out.text(unit_end(0) + 19_000_000, START_NS, 0, "hi")
    out.speech(unit_end(0) + 20_000_000, unit_end(0) + 200_000_000)
    out.state(unit_end(0) + 21_000_000, unit_end(0), 0, mode=1)
    summary = summarize(silent_bag, out.close())
    assert summary["turn_texts"][0]["start_s"] == 0.0
    assert summary["input"]["origin_ns"] == START_NS


def test_a_clean_bags_tail_padding_is_not_reported_as_a_gap(
    silent_bag: InputBag, tmp_path: Path
) -> None:
    out = Outputs(tmp_path / "out")
    # 5 s of audio from START_NS: units end at 1.035, 2.035, ... 5.035 s; the last one is padded
    # with 35 ms (560 samples at 16 kHz) of zeros past the input's end.
    for k in range(5):
        out.state(unit_end(k) + 20_000_000, unit_end(k), k, gap=560 if k == 4 else 0)
    summary = summarize(silent_bag, out.close())
    assert summary["counters"]["gap_samples_filled"] == 0
    assert summary["tail_padding_samples"] == 560


def test_a_real_gap_is_still_reported_beside_the_tail_padding(
    silent_bag: InputBag, tmp_path: Path
) -> None:
    out = Outputs(tmp_path / "out")
    for k in range(5):
        out.state(
            unit_end(k) + 20_000_000,
            unit_end(k),
            k,
            gap=(800 if k >= 2 else 0) + (560 if k == 4 else 0),
        )
    summary = summarize(silent_bag, out.close())
    assert summary["counters"]["gap_samples_filled"] == 800


@pytest.fixture(scope="module")
def speech_bag(tmp_path_factory: pytest.TempPathFactory) -> InputBag:
    """5 s with "Hello robot." spoken from 0.5 s (espeak-ng)."""
    path = tmp_path_factory.mktemp("report") / "speech"
    write_bag(path, short_config(duration_s=5.0, width=32, height=24, fps=1.0))
    return InputBag(path)


def test_user_speech_is_on_the_capture_clock_and_each_response_has_its_latency(
    speech_bag: InputBag, tmp_path: Path
) -> None:
    from omni_ros.tools.synth import speak

    voice = speak("Hello robot.", 16_000)
    voiced = np.flatnonzero(np.abs(voice) > 0.01)
    truth = (0.5 + voiced[0] / 16_000, 0.5 + voiced[-1] / 16_000)
    summary = summarize(speech_bag, _conversation(tmp_path / "out"))
    ((start, end),) = summary["user_speech"]
    assert abs(start - truth[0]) < 0.1
    assert truth[1] - 0.05 < end < truth[1] + 0.4  # the VAD's hangover ends a run late
    # The node's own decisions (omni/user_speaking) are reported beside them, at their log times.
    assert summary["user_speaking_published"] == [[0.1, 0.9]]
    (response,) = summary["responses"]
    scheduled = (unit_end(1) + 200_000_000 - START_NS) / NS_PER_S
    assert response["speech_at_s"] == pytest.approx(scheduled)
    assert response["latency_ms"] == pytest.approx((scheduled - end) * 1000, abs=1.0)
    assert summary["response_latency_ms"]["median"] == response["latency_ms"]


@pytest.mark.skipif(
    "omni_ros_msgs/msg/SpeechFlush" not in STORE.types, reason="no SpeechFlush message"
)
def test_flushes_come_from_omni_speech_flush_with_their_reason_and_turn(
    silent_bag: InputBag, tmp_path: Path
) -> None:
    out = Outputs(tmp_path / "out")
    out.state(unit_end(0) + 20_000_000, unit_end(0), 0)
    out.speech(unit_end(1) + 20_000_000, unit_end(1) + 200_000_000, turn_id=1)
    out.state(unit_end(1) + 21_000_000, unit_end(1), 1, mode=1)
    # A chunk of the NEXT turn inside the flushed span must not count as cancelled.
    out.speech(unit_end(1) + 30_000_000, unit_end(1) + 800_000_000, chunks=1, turn_id=2)
    onset = unit_end(1) + 500_000_000
    out.bag.write(
        "/omni/speech_flush",
        "omni_ros_msgs/msg/SpeechFlush",
        onset + 150_000_000,
        _msg(
            "omni_ros_msgs/msg/SpeechFlush",
            header=_header(onset + 150_000_000),
            reason=0,
            turn_id=1,
            dropped_from=_time(onset + 100_000_000),
            dropped_until=_time(unit_end(1) + 1_200_000_000),
            onset=_time(onset),
        ),
    )
    out.state(unit_end(2) + 20_000_000, unit_end(2), 2)
    summary = summarize(silent_bag, out.close())
    (flush,) = summary["flushes"]
    assert flush["reason"] == "barge_in"
    assert flush["turn_id"] == 1
    assert flush["latency_ms"] == pytest.approx(150.0)
    assert summary["barge_in_latency_ms"]["median"] == pytest.approx(150.0)
    # Turn 1's chunks (scheduled 0.2-1.2 s after unit 1's end) from 0.6 s on are cancelled
    # (6 x 100 ms); turn 2's chunk at 0.8 s is not.
    assert summary["speech_seconds_cancelled"] == pytest.approx(0.6)
    assert summary["units"] == 3


def test_the_timeline_plot_is_written(silent_bag: InputBag, tmp_path: Path) -> None:
    png = tmp_path / "timeline.png"
    plot_timeline(silent_bag, _conversation(tmp_path / "out"), png)
    assert png.stat().st_size > 10_000


def _playback(out: Outputs, heard_ns: int, scheduled_ns: int, samples: int, **flags: bool) -> None:
    out.bag.write(
        "/speaker/playback",
        "omni_ros_msgs/msg/Playback",
        heard_ns + 1_000_000,
        _msg(
            "omni_ros_msgs/msg/Playback",
            header=_header(heard_ns),
            turn_id=1,
            scheduled=_time(scheduled_ns),
            sample_rate=24_000,
            samples=samples,
            **flags,
        ),
    )


@pytest.mark.skipif("omni_ros_msgs/msg/Playback" not in STORE.types, reason="no Playback message")
def test_the_speakers_playback_reports_say_what_was_heard_and_how_many_chunks_were_late(
    silent_bag: InputBag, tmp_path: Path
) -> None:
    out = Outputs(tmp_path / "out")
    out.state(unit_end(0) + 20_000_000, unit_end(0), 0)
    out.speech(unit_end(1) + 20_000_000, unit_end(1) + 200_000_000, turn_id=1)
    out.state(unit_end(1) + 21_000_000, unit_end(1), 1, mode=1)
    t0 = unit_end(1) + 200_000_000
    _playback(out, t0 + 2_000_000, t0, 2400)  # on time (2 ms after its stamp)
    _playback(out, t0 + 140_000_000, t0 + 100_000_000, 2400, late=True)  # 40 ms late
    # The third is cut by a flush after 600 samples: two reports, one chunk heard 25 ms of.
    _playback(out, t0 + 200_000_000, t0 + 200_000_000, 2400)
    _playback(out, t0 + 200_000_000, t0 + 200_000_000, 600, cut=True)
    out.state(unit_end(2) + 20_000_000, unit_end(2), 2)
    summary = summarize(silent_bag, out.close())
    spk = summary["speaker"]
    assert spk["chunks_heard"] == 3
    assert spk["late_chunks"] == 1
    assert spk["cut_chunks"] == 1
    assert spk["heard_seconds"] == pytest.approx(0.1 + 0.1 + 0.025)
    assert spk["heard_minus_scheduled_ms"]["median"] == pytest.approx(2.0)
    origin = summary["input"]["origin_ns"]
    expected = [(t0 + 2_000_000 - origin) / NS_PER_S, (t0 + 102_000_000 - origin) / NS_PER_S]
    assert spk["played_s"][0] == pytest.approx(expected, abs=1e-3)
    png = tmp_path / "timeline.png"
    plot_timeline(silent_bag, tmp_path / "out", png)
    assert png.stat().st_size > 10_000


def test_without_playback_reports_the_speaker_figures_are_none(
    silent_bag: InputBag, tmp_path: Path
) -> None:
    out = Outputs(tmp_path / "out")
    out.state(unit_end(0) + 20_000_000, unit_end(0), 0)
    assert summarize(silent_bag, out.close())["speaker"] is None
