"""The CUDA emulation catches the bugs it is there to catch, on deliberately broken kernels.

tests/emu/broken_kernels.cu holds small kernels with one bug each and their fixed
twins. It is rewritten and compiled here with g++ against csrc/emu/cuda_emu.h only
(no torch), once plainly and once under AddressSanitizer, and run per case and
schedule as a subprocess (a crash cannot take pytest down).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "emu" / "broken_kernels.cu"
sys.path.insert(0, str(ROOT / "csrc" / "emu"))
from rewrite_launches import emulated_source  # noqa: E402

SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2), ("random", 3)]

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def _line_of(text: str) -> int:
    """The line of broken_kernels.cu that contains ``text`` (for the error messages)."""
    for i, line in enumerate(SOURCE.read_text().splitlines(), 1):
        if text in line:
            return i
    raise AssertionError(f"{text!r} not in {SOURCE}")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Compiles the program with the given extra flags (cached per flag set)."""
    tmp = tmp_path_factory.mktemp("broken_kernels")
    src = tmp / "broken_kernels.cpp"
    src.write_text(emulated_source(SOURCE, display_name="tests/emu/broken_kernels.cu"))
    built: dict[tuple, Path] = {}

    def compile_with(*flags: str) -> Path:
        if flags not in built:
            exe = tmp / f"broken_kernels_{len(built)}"
            cmd = ["g++", "-std=c++17", "-O1", "-g", "-Wno-unknown-pragmas",
                   f"-I{ROOT / 'csrc' / 'emu'}", *flags, str(src), "-o", str(exe)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr[-3000:]
            built[flags] = exe
        return built[flags]

    return compile_with


def run(exe: Path, case: str, schedule: str = "forward", seed: int = 0) -> tuple[str, str]:
    """("ok", output) or ("error", message) of one run; a crash fails the test."""
    proc = subprocess.run([str(exe), case, schedule, str(seed)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{case}/{schedule}: rc={proc.returncode}\n{proc.stderr[-3000:]}"
    kind, _, rest = proc.stdout.strip().partition(" ")
    assert kind in ("ok", "error"), proc.stdout
    return kind, rest


def outputs(exe: Path, case: str) -> dict[tuple, str]:
    results = {}
    for schedule, seed in SCHEDULES:
        kind, out = run(exe, case, schedule, seed)
        assert kind == "ok", f"{case} under {schedule}: {out}"
        results[(schedule, seed)] = out
    return results


@pytest.mark.parametrize("broken,fixed", [
    ("two_sums_one_buffer", "two_sums_two_buffers"),
    ("missing_barrier", "with_barrier"),
])
def test_a_race_on_shared_memory_shows_up_as_a_difference_between_schedules(build, broken, fixed):
    exe = build()
    good = outputs(exe, fixed)
    assert len(set(good.values())) == 1, "the fixed kernel must give the same bits everywhere"
    bad = outputs(exe, broken)
    assert len(set(bad.values())) > 1, f"{broken}: every schedule gave the same output"
    assert any(v != good[k] for k, v in bad.items())


def test_the_reused_buffer_race_is_hidden_by_the_forward_schedule_alone(build):
    """Why more than one schedule is needed: run in thread order, the race never fires."""
    exe = build()
    assert run(exe, "two_sums_one_buffer", "forward") == run(exe, "two_sums_two_buffers", "forward")
    assert run(exe, "two_sums_one_buffer", "reverse") != run(exe, "two_sums_two_buffers", "reverse")


def test_lanes_that_return_before_a_shuffle_are_reported(build):
    exe = build()
    line = _line_of("__shfl_xor_sync(0xffffffffu, v, off)")
    for schedule, seed in SCHEDULES:
        kind, msg = run(exe, "return_before_shuffle", schedule, seed)
        assert kind == "error", f"{schedule}: not reported"
        assert "return_before_shuffle" in msg and "returned" in msg
        assert f"__shfl_xor_sync tests/emu/broken_kernels.cu:{line}" in msg, msg
    assert len(set(outputs(exe, "shuffle_then_return").values())) == 1


def test_an_index_past_the_end_is_caught_by_address_sanitizer(build):
    try:
        exe = build("-fsanitize=address", "-fno-omit-frame-pointer")
    except AssertionError as exc:  # pragma: no cover - depends on the toolchain
        pytest.skip(f"g++ cannot build with AddressSanitizer here: {exc}")
    proc = subprocess.run([str(exe), "index_past_end", "forward"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "heap-buffer-overflow" in proc.stderr
    assert f"index_past_end(float const*, float*, int) tests/emu/broken_kernels.cu:" \
           f"{_line_of('if (i <= n) out[i]')}" in proc.stderr
    for schedule, seed in SCHEDULES[:3]:  # the fixed kernel is clean under ASan, on fiber stacks
        assert run(exe, "index_in_bounds", schedule, seed)[0] == "ok"
        assert run(exe, "two_sums_two_buffers", schedule, seed)[0] == "ok"


@pytest.mark.parametrize("case,expected", [
    ("barriers_at_two_sites", "wait at __syncthreads tests/emu/broken_kernels.cu:"),
    ("barrier_never_reached", "deadlock in block (0, 0, 0)"),
    ("mask_mismatch", "mask 0xffff"),
    ("too_many_threads", "block (2048, 1, 1) exceeds the CUDA limit"),
])
def test_synchronisation_and_launch_errors_are_reported(build, case, expected):
    exe = build()
    for schedule, seed in SCHEDULES[:3]:
        kind, msg = run(exe, case, schedule, seed)
        assert kind == "error" and expected in msg, f"{schedule}: {kind} {msg}"
        assert msg.startswith("CUDA emulation: kernel ")


def _expected_shuffles(values: list[int]) -> list[int]:
    """CUDA's results for shuffle_patterns, lane by lane (two warps of 32)."""
    out = []
    for t, v in enumerate(values):
        warp, lane = divmod(t, 32)
        at = lambda j: values[warp * 32 + j]  # noqa: E731
        seg8, seg16 = lane & ~7, lane & ~15
        ballot = sum(1 << j for j in range(32) if at(j) % 3 == 0)
        out += [
            at(lane ^ 5),
            at(lane + 3) if lane + 3 < 32 else v,
            at(lane - 2) if lane >= 2 else v,
            at(7),
            at(lane + 1) if lane + 1 < seg8 + 8 else v,
            ballot - (1 << 32) if ballot >= 1 << 31 else ballot,
            at(lane ^ 4) if (lane ^ 4) & ~15 <= seg16 else v,
            1,
        ]
    return out


@pytest.mark.parametrize("flags", [(), ("-DDEQ_EMU_USE_UCONTEXT",)], ids=["asm-switch", "ucontext"])
def test_each_lane_gets_exactly_its_partners_value(build, flags):
    exe = build(*flags)
    want = _expected_shuffles([100 + 7 * i for i in range(64)])
    for schedule, seed in SCHEDULES:
        kind, out = run(exe, "shuffle_patterns", schedule, seed)
        assert kind == "ok", out
        assert [int(x) for x in out.split()] == want, schedule
