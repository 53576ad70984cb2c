"""What fastkd's Triton path needs of the installed versions: no `triton.knobs` (Triton >= 3.4) requirement."""
import triton

from fastkd.kernels import triton_utils


def test_interpreter_detection_falls_back_to_the_environment_without_triton_knobs(monkeypatch):
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        assert triton_utils._interpreted() == bool(knobs.runtime.interpret)
        monkeypatch.delattr(triton, "knobs")  # as on Triton < 3.4 (torch 2.5-2.7)
    for value, expected in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert triton_utils._interpreted() is expected
    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton_utils._interpreted() is False
