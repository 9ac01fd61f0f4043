"""`coilsight inspect`: real packs (the tiny exact pack, the shipped steel and wafer packs) over real
image files; outputs, the Severstal CSV read back by the project's reader, bad files, exit codes,
and the same events as the running agent publishes for the same frames."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from tinypack import CLASSES, clean_frame, frame_with, make_pack

from agent.cli import main
from agent.tools.inspect import BadImage, Inspector, decode_image_bytes, inspect_image
from engines.packs import shipped_pack_dir
from training.datasets.severstal import read_severstal

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
STREAM_KEYS = {"v", "type", "agent", "seq", "ts_ns", "coil", "camera", "index", "frame_ts_ns", "recv_ts_ns"}


def write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


@pytest.fixture
def pack(tmp_path):
    return make_pack(tmp_path / "pack")


def generated_folder(folder: Path) -> dict[str, np.ndarray]:
    """Frames the tiny pack reads exactly: two defective, one clean, one with both classes."""
    both = frame_with("bright", 32, 16)
    both[40:48, 200:208] = 0
    imgs = {"a.png": frame_with("bright", 64, 8), "b.png": frame_with("dark", 120, 32, size=8),
            "clean.png": clean_frame(), "both.png": both}
    for name, img in imgs.items():
        write(folder / name, img)
    return imgs


def test_generated_images_overlays_json_and_csv_round_trip(tmp_path, pack, capsys):
    imgs = generated_folder(tmp_path / "in")
    out = tmp_path / "out"
    rc = main(["inspect", str(tmp_path / "in"), "--models", str(pack), "--out", str(out), "--csv", "--threads", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "4 image(s) inspected" in captured.out and "0 bad file(s)" in captured.out
    assert "\r" not in captured.err  # stderr is no TTY here: no progress line
    # JSON: the agent's defect keys without the stream's, plus the image
    doc = json.loads((out / "both.events.json").read_text())
    assert sorted((e["class"], tuple(e["bbox_px"])) for e in doc["events"]) == [
        ("bright", (32, 16, 48, 32)), ("dark", (200, 40, 208, 48))]
    ev = doc["events"][0]
    assert {"class", "class_id", "confidence", "gate_score", "bbox_px", "area_px", "across_mm", "along_mm",
            "width_mm", "length_mm", "area_mm2", "models", "image"} == set(ev)
    assert json.loads((out / "clean.events.json").read_text())["events"] == []
    # overlays: PNG of the image's size, tinted where the defect is, untouched elsewhere
    for name, img in imgs.items():
        ov = cv2.imread(str(out / f"{Path(name).stem}.overlay.png"), cv2.IMREAD_COLOR)
        assert ov is not None and ov.shape == (*img.shape, 3)
    ov = cv2.imread(str(out / "a.overlay.png"), cv2.IMREAD_COLOR)
    assert not np.array_equal(ov[12, 70], [255, 255, 255])  # inside the square: tinted
    assert np.array_equal(ov[60, 10], [100, 100, 100])  # far from it: the image
    # CSV: read back by the project's Severstal reader, the same masks as the squares drawn
    ds = read_severstal(out / "masks.csv", tmp_path / "in", CLASSES)
    by_name = {Path(s.source).name: s for s in ds}
    truth = np.zeros((2, 64, 256), bool)
    truth[0, 8:24, 64:80] = True
    assert np.array_equal(by_name["a.png"].masks, truth)
    assert not by_name["clean.png"].masks.any()
    assert by_name["both.png"].masks[1, 40:48, 200:208].all() and by_name["both.png"].masks[1].sum() == 64
    # and the same masks inspect_image hands a caller (the web page)
    with Inspector(pack, threads=1) as insp:
        for name, img in imgs.items():
            res = inspect_image(insp, img, name)
            assert np.array_equal(res.masks, by_name[name].masks), name
            assert res.overlay_png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_files_are_listed_and_skipped_and_exit_codes(tmp_path, pack, capsys):
    good = write(tmp_path / "in" / "good.png", frame_with("bright", 64, 8))
    (tmp_path / "in" / "garbage.png").write_bytes(b"not a png at all")
    write(tmp_path / "in" / "deep.png", np.full((64, 256), 1000, np.uint16))
    np.save(tmp_path / "in" / "four.npy", np.zeros((64, 256, 4), np.uint8))
    write(tmp_path / "in" / "huge.png", np.zeros((64 * 5, 256), np.uint8))
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    rc = main(["inspect", str(tmp_path / "in"), str(tmp_path / "missing"), "--models", str(pack), "--out", str(out)])
    text = capsys.readouterr()
    assert rc == 0
    assert "Traceback" not in text.out + text.err
    report = json.loads((out / "inspect.json").read_text())
    assert [r["image"] for r in report["images"]] == ["good.png"]
    reasons = {Path(b["file"]).name: b["reason"] for b in report["bad_files"]}
    assert "not an image OpenCV can decode" in reasons["garbage.png"]
    assert "uint16 pixels" in reasons["deep.png"]
    assert "4 channel(s); the tiny pack takes 1" in reasons["four.npy"]
    assert "more than 4x the tiny frame" in reasons["huge.png"]
    assert "not an image" in reasons["empty.jpg"]
    assert reasons["missing"] == "no such file or folder"
    for name in reasons:
        assert f"{name}: " in text.out
    # nothing readable: non-zero, and the reason said
    rc = main(["inspect", str(tmp_path / "in" / "garbage.png"), "--models", str(pack), "--out", str(out)])
    text = capsys.readouterr()
    assert rc == 1 and "nothing could be inspected (1 bad file(s))" in text.err
    # no model pack there: a usage error, one line
    rc = main(["inspect", str(good), "--models", str(tmp_path), "--out", str(out)])
    assert rc == 2 and "no model pack at" in capsys.readouterr().err


def test_resize_and_pad_are_said(tmp_path, pack):
    with Inspector(pack, threads=1) as insp:
        odd = np.full((60, 250), 100, np.uint8)
        odd[8:24, 64:80] = 255
        res = inspect_image(insp, odd, "odd")
        assert res.handling == ["padded 250x60 -> 256x64 (edge values; events in the image's pixels)"]
        assert [e["bbox_px"] for e in res.events] == [[64, 8, 80, 24]] and res.masks.shape == (2, 60, 250)
        rgb = np.repeat(frame_with("bright", 64, 8)[:, :, None], 3, axis=2)
        rgb[0, 0] = (1, 2, 3)  # not grey content: converted, and said
        assert inspect_image(insp, rgb, "rgb").handling == ["colour converted to grey"]
        with pytest.raises(BadImage, match="2 channel"):
            insp.prepare(np.zeros((64, 256, 2), np.uint8), "two")
    with Inspector(shipped_pack_dir("wafer"), threads=1) as insp:  # fixed 52x52 input: resized, nearest
        from lines_tinypacks import wafer_map

        big = cv2.resize(wafer_map([(5, 20, 5, 20)]), (104, 104), interpolation=cv2.INTER_NEAREST)
        res = inspect_image(insp, big, "wafer")
        assert res.handling == ["resized 104x104 -> 52x52 (nearest; the model takes only 52x52)"]
        assert res.masks is None and res.overlay_png.startswith(b"\x89PNG")
        for ev in res.events:
            assert ev["patterns"] and ev["dies"]["dies"] > 0


def test_npy_and_channels_first_decode(tmp_path):
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros((6, 32, 40), np.uint8))
    assert decode_image_bytes(buf.getvalue(), "die").shape == (32, 40, 6)
    buf = io.BytesIO()
    np.save(buf, np.zeros((8, 8), np.float32))
    with pytest.raises(BadImage, match="float32"):
        decode_image_bytes(buf.getvalue(), "f")


def test_same_events_as_the_running_agent(running_agent, pack, tmp_path):
    """The agent's events for frames over loopback equal inspect's for the same images, less the stream keys."""
    from tests_support_events import send_coil_collected

    from engines.geometry import CameraGeometry

    agent = running_agent()
    imgs = list(generated_folder(tmp_path / "in").values())
    col = send_coil_collected(agent.cfg, "coil-I", [(im, None) for im in imgs], mm_per_px_y=2.0)
    got = col.defects("coil-I")
    mine = []
    cam0 = agent.cfg.cameras[0]
    with Inspector(pack, threads=1, geometry=CameraGeometry(cam0.mm_per_px_x, cam0.mm_per_px_y,
                                                            cam0.offset_x_mm)) as insp:
        for i, im in enumerate(imgs):
            for ev in inspect_image(insp, im, f"{i}").events:
                ev["along_mm"] = round(ev["along_mm"] + i * 64 * 2.0, 2)  # the frame's place on the coil
                mine.append((i, ev))
    assert len(got) == len(mine) == 4
    for (i, ev), d in zip(sorted(mine, key=lambda t: (t[0], t[1]["bbox_px"])),
                          sorted(got, key=lambda d: (d["index"], d["bbox_px"]))):
        assert d["index"] == i
        agent_ev = {k: v for k, v in d.items() if k not in STREAM_KEYS}
        assert agent_ev == {k: v for k, v in ev.items() if k != "image"}


@pytest.mark.skipif(not (DATA / "neu_det" / "IMAGES").is_dir(), reason="shared data (neu_det) not here")
def test_shipped_steel_pack_on_shared_data(tmp_path, capsys):
    src = sorted((DATA / "neu_det" / "IMAGES").glob("*.jpg"))
    folder = tmp_path / "in"
    folder.mkdir()
    for p in [next(p for p in src if p.name.startswith(c + "_")) for c in ("crazing", "patches", "scratches")]:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    rc = main(["inspect", str(folder), "--profile", "steel", "--out", str(out), "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "inspect.json").read_text())
    assert report["inspected"] == 3 and sum(r["events"] for r in report["images"]) >= 1
    classes = json.loads((shipped_pack_dir("steel") / "model.json").read_text())["classes"]
    ds = read_severstal(out / "masks.csv", folder, classes)
    with Inspector(shipped_pack_dir("steel"), threads=1) as insp:
        for s in ds:
            res = inspect_image(insp, decode_image_bytes(Path(s.source).read_bytes()), Path(s.source).name)
            assert np.array_equal(res.masks, s.masks)
            assert s.masks.any() == bool(res.events)


def test_instance_pack_events_and_masks(tmp_path):
    """An instance pack (format 3): one event per instance, with `instance`, its box the model's, and
    its mask the class's probs inside that box."""
    from tinyinstances import frame_with_squares, make_instance_pack

    pack = make_instance_pack(tmp_path / "inst")
    img = frame_with_squares([("bright", 40, 20), ("dark", 160, 28)])
    with Inspector(pack, threads=1) as insp:
        res = inspect_image(insp, img, "sq")
    assert sorted((e["class"], e["bbox_px"]) for e in res.events) == [
        ("bright", [40, 20, 60, 40]), ("dark", [160, 28, 180, 48])]
    assert all(e["instance"] == e["confidence"] for e in res.events)
    truth = np.zeros((2, 64, 256), bool)
    truth[0, 20:40, 40:60] = True
    truth[1, 28:48, 160:180] = True
    assert np.array_equal(res.masks, truth)


def test_progress_only_where_asked(tmp_path, pack):
    import io

    from agent.tools.inspect_run import run_inspect

    write(tmp_path / "in" / "a.png", frame_with("bright", 64, 8))
    err, out = io.StringIO(), io.StringIO()
    assert run_inspect([tmp_path / "in"], tmp_path / "o", pack_dir=pack, stream=out, err=err, progress=True) == 0
    assert "\rinspect: 1/1 frames" in err.getvalue()
    err = io.StringIO()
    assert run_inspect([tmp_path / "in"], tmp_path / "o", pack_dir=pack, stream=out, err=err) == 0
    assert err.getvalue() == ""  # a StringIO is no TTY


def test_shipped_steel_pack_on_a_generated_strip(tmp_path, capsys):
    """Without the shared data: the shipped steel pack over a generated strip writes its overlay, JSON
    and a masks.csv the Severstal reader takes back, equal to the masks inspect_image returns."""
    from agent.tools.camera_sim import synthetic_frames

    folder = tmp_path / "in"
    imgs = {f"strip{i}.png": img for i, (img, _) in enumerate(synthetic_frames(2, 1.0, seed=5))}
    for name, img in imgs.items():
        write(folder / name, img)
    out = tmp_path / "out"
    assert main(["inspect", str(folder), "--out", str(out), "--threads", "1"]) == 0, capsys.readouterr().err
    assert (out / "strip0.overlay.png").is_file() and (out / "strip1.events.json").is_file()
    classes = json.loads((shipped_pack_dir("steel") / "model.json").read_text())["classes"]
    ds = read_severstal(out / "masks.csv", folder, classes)
    with Inspector(shipped_pack_dir("steel"), threads=1) as insp:
        for s in ds:
            res = inspect_image(insp, imgs[Path(s.source).name], Path(s.source).name)
            assert res.masks.shape == (6, 256, 1600) and np.array_equal(res.masks, s.masks)
