"""A coil's summary names the models that took its frames, also when a hot swap comes between the
coil's last frame and its summary (real ONNX Runtime sessions on two tiny packs, real registry)."""
from __future__ import annotations

import onnx
from tinypack import clean_frame, frame_with, write_pack_files, CLASSES

from agent.batcher import Frame, FrameQueue
from agent.coil import CoilRegistry
from agent.inference import Inference, open_models
from agent.protocol import FrameHeader


def second_pack(tiny_pack, directory):
    """The tiny pack with other hashes: the same graphs with another doc string."""
    directory.mkdir()
    for name in ("gate.onnx", "seg.onnx"):
        m = onnx.load(tiny_pack / name)
        m.doc_string = "retrained"
        onnx.save(m, directory / name)
    return write_pack_files(directory, {"gate": {"file": "gate.onnx", "output": "scores"},
                                        "seg": {"file": "seg.onnx", "output": "probs", "output_stride": 4}},
                            CLASSES, profile="tiny", channels=1, height=64, width=256, gate_threshold=0.5,
                            min_area_px=16)


def frame(coil, index, image):
    h = FrameHeader("cam0", coil, index, index, 0, image.shape, "uint8", "raw", float(index))
    return Frame(h, image[None], 0.0, 0)


def test_summary_names_the_models_that_took_the_coil(tmp_path, agent_config, tiny_pack):
    cfg = agent_config()
    old = open_models(cfg)
    new = open_models(agent_config(models={"dir": str(second_pack(tiny_pack, tmp_path / "v2"))}))
    assert old.pack.versions() != new.pack.versions()
    coils = CoilRegistry(budget_s=300.0, provisional_at=0.9, idle_timeout_s=30.0, worst_n=3, classes=CLASSES)
    published: list[tuple[str, dict]] = []
    inf = Inference(cfg=cfg, frames=FrameQueue(16), coils=coils, models=old,
                    submit=lambda topic, body: published.append((topic, body)))
    try:
        # coil A ends (coil_end) before its frames are through: its summary comes from the worker
        coils.coil_start("cam0", "A")
        batch = [frame("A", i, frame_with("bright", 32, 16) if i == 0 else clean_frame()) for i in range(3)]
        for f in batch:
            assert coils.admit("cam0", "A", f.header.index, 0.0)[0] == "ok"
        assert coils.coil_end("cam0", "A", 3, None) == []
        inf.request_swap(new)  # the swap lands while the worker still holds the old models
        inf.process(batch, old)
        summary_a = [b for t, b in published if t == "summary"]
        assert len(summary_a) == 1 and summary_a[0]["coil"] == "A"
        assert summary_a[0]["models"] == old.pack.versions()
        assert all(b["models"] == old.pack.versions() for t, b in published if t == "defect")

        # coil B's frames are through before the swap; its coil_end (the ingest side) comes after it
        coils.coil_start("cam0", "B")
        batch = [frame("B", i, clean_frame()) for i in range(2)]
        for f in batch:
            coils.admit("cam0", "B", f.header.index, 0.0)
        inf.models = old
        inf.process(batch, old)
        inf.models = new
        (summary_b,) = coils.coil_end("cam0", "B", 2, None)
        assert inf.decorate_summary(summary_b)["models"] == old.pack.versions()
        assert inf.decorate_summary(summary_b)["backend"] == {"gate": "onnxruntime-cpu", "seg": "onnxruntime-cpu"}

        # a coil no frame of which went through the models is named after the running ones
        coils.coil_start("cam0", "C")
        (summary_c,) = coils.coil_end("cam0", "C", 0, None)
        decorated = inf.decorate_summary(summary_c)
        assert decorated["models"] == new.pack.versions() and decorated["profile"] == "tiny"
    finally:
        old.close()
        new.close()
