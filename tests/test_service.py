"""The service layer (agent/service/), called directly: users and keys, protect and recover on
files and folders (formats, metadata, quality, names, records), the log, and every bad input."""

import fcntl
import hashlib
import io
import os
import sqlite3
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE
from PIL import Image, ImageCms
from sqlalchemy import select

from agent import keys as keystore
from agent import images, pipeline
from agent import store as db
from agent.images import encode_image, estimate_jpeg_quality, image_psnr, webp_lossless
from agent.keys import KeyStoreError
from agent.images import read_image
from agent.pipeline import DEFAULT_MODEL_PATH, ProtectOptions
from agent.store import DatabaseLockedError, ProvenanceError
from agent.service import home as service_home
from agent.service.home import AgentBusyError, ServiceError, resolve_user
from agent.service.log import check_image, log_records, verify_log
from agent.service.protect import protect_paths
from agent.service.recover import recover_paths
from agent.service.users import add_user, change_passphrase, export_keys, import_keys, init_user, list_users, remove_user, rotate_key, show_keys


PW = "correct horse"
KDF = 2**14  # the store's minimum: fast unlocks in tests
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
DATE = "2024:05:01 10:00:00"


def crop(x: int = 0, y: int = 0, w: int = 160, h: int = 120) -> Image.Image:
    with Image.open(SAMPLE) as image:
        return image.convert("RGB").crop((x, y, x + w, y + h))


def camera_exif() -> Image.Exif:
    """What a phone writes: turned 90° (orientation 6), GPS, serial numbers, owner, capture date."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Canon"
    exif[0x0132] = DATE
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = DATE
    sub[0xA431] = "BODY-SERIAL-123"
    sub[0xA435] = "LENS-SERIAL-456"
    sub[0xA430] = "Jane Doe"
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (52.0, 31.0, 12.5)
    return exif


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_home(root: Path, user: str = "alice") -> Path:
    home = root / "home"
    init_user(home, user, PW, kdf_n=KDF)
    return home


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return make_home(tmp_path_factory.mktemp("agent"))


@pytest.fixture
def photos(tmp_path):
    """A folder: a PNG, a phone JPEG (EXIF orientation 6, GPS, serials, ICC, quality 97) in a
    sub-folder, a quality-75 JPEG and a text file that a folder walk skips."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    crop().save(folder / "a.png")
    crop(100, 50).save(folder / "sub" / "b.jpg", quality=97, exif=camera_exif().tobytes(), icc_profile=SRGB)
    crop(200, 100).save(folder / "c.jpg", quality=75)
    (folder / "notes.txt").write_text("not a photo")
    return folder


def records_by_id(home: Path) -> dict[str, db.Record]:
    return {r.id: r for r in log_records(home, {"alice": PW}).records}


# ---------------------------------------------------------------- users and keys

def test_init_user_writes_keys_and_log_rows_and_registers_the_default_model(tmp_path):
    home = tmp_path / "home"
    info = init_user(home, "alice", PW, kdf_n=KDF)
    assert (home / "keys" / "alice.key").is_file() and info["kdf"]["n"] == KDF
    factory = db.open_database(db.database_path(home))
    try:
        with factory() as session:
            user = session.scalar(select(db.UserRow).where(db.UserRow.name == "alice"))
            assert [(k.key_id, k.active) for k in user.keys] == [(info["active_key_id"], True)]
            models = session.scalars(select(db.ModelRow)).all()
            assert [(m.sha256, m.user_id) for m in models] == [(db.file_sha256(DEFAULT_MODEL_PATH), None)]
    finally:
        factory.kw["bind"].dispose()
    with pytest.raises(KeyStoreError, match="already has a key file"):
        init_user(home, "alice", PW, kdf_n=KDF)
    with pytest.raises(KeyStoreError, match="invalid user name"):
        init_user(home, "Not A Name", PW, kdf_n=KDF)


def test_users_add_list_resolve_and_remove(tmp_path):
    home = make_home(tmp_path)
    assert resolve_user(home) == "alice"  # the only user
    add_user(home, "bob", "bob's words", kdf_n=KDF)
    assert [u["user"] for u in list_users(home)] == ["alice", "bob"]
    with pytest.raises(ServiceError, match="several users"):
        resolve_user(home)
    with pytest.raises(ServiceError, match="unknown user 'carol'.*alice, bob"):
        resolve_user(home, "carol")
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        remove_user(home, "bob", PW)
    remove_user(home, "bob", "bob's words")
    assert [u["user"] for u in list_users(home)] == ["alice"]


def test_keys_rotate_export_import_and_change_passphrase(tmp_path, photos):
    home = make_home(tmp_path)
    [before] = protect_paths(home, None, PW, [photos / "a.png"])
    old_id = show_keys(home)["active_key_id"]
    rotated = rotate_key(home, None, PW)
    assert rotated["rgan_keys"][0]["id"] == old_id and rotated["active_key_id"] != old_id
    [after] = protect_paths(home, None, PW, [photos / "c.jpg"])
    records = records_by_id(home)
    assert records[before.record_id].rgan_key_id == old_id
    assert records[after.record_id].rgan_key_id == rotated["active_key_id"]
    # the image protected before the rotation still recovers, with the older key
    [recovered] = recover_paths(home, [before.output], passphrase=PW)
    assert recovered.ok and recovered.record_id == before.record_id

    backup = tmp_path / "alice.backup"
    export_keys(home, None, PW, backup, "backup words")
    with pytest.raises(KeyStoreError, match="never overwrites"):
        export_keys(home, None, PW, backup, "backup words")
    imported = import_keys(home, backup, "backup words", "carol's words", "carol")
    assert imported["user"] == "carol" and len(imported["rgan_keys"]) == 2
    change_passphrase(home, "alice", PW, "new words")
    keystore.unlock(home / "keys", "alice", "new words")
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        protect_paths(home, "alice", PW, [photos / "a.png"])
    assert verify_log(home).ok


def test_importing_keys_the_log_knows_under_another_signing_key_changes_nothing(tmp_path):
    a, b = make_home(tmp_path / "a"), make_home(tmp_path / "b")  # two different users called alice
    backup = tmp_path / "alice-from-a.backup"
    export_keys(a, "alice", PW, backup, "backup words")
    before = (b / "keys" / "alice.key").read_bytes()
    with pytest.raises(ProvenanceError, match="another signing key"):
        import_keys(b, backup, "backup words", PW, replace=True)
    assert (b / "keys" / "alice.key").read_bytes() == before


# ---------------------------------------------------------------- protect

def test_protect_a_folder_keeps_formats_orientation_and_safe_metadata(home, photos, tmp_path):
    originals = {p: sha(p) for p in photos.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    progress = []
    results = protect_paths(home, "alice", PW, [photos], out,
                                    on_progress=lambda done, total, r: progress.append((done, total)))
    assert [r.error for r in results] == [None, None, None]
    assert progress == [(0, 3), (1, 3), (2, 3), (3, 3)]
    by_name = {r.source.name: r for r in results}
    assert by_name["a.png"].output == out / "a.protected.png"
    assert by_name["b.jpg"].output == out / "sub" / "b.protected.jpg"  # the folder's layout is kept
    assert not list(photos.rglob("*.protected.*"))  # with -o nothing is written beside the inputs

    with Image.open(out / "a.protected.png") as image:
        assert (image.format, image.size, image.mode) == ("PNG", (160, 120), "RGB")
    with Image.open(out / "sub" / "b.protected.jpg") as image:
        assert image.format == "JPEG"
        assert image.size == (120, 160)  # orientation 6 applied: the pixels are turned, the tag says 1
        assert estimate_jpeg_quality(image.quantization) == 97  # matched to the original
        assert image.info.get("icc_profile") == SRGB
        exif = image.getexif()
        assert exif[0x0112] == 1 and exif[0x0132] == DATE and exif[0x010F] == "Canon"
        sub = exif.get_ifd(0x8769)
        assert sub[0x9003] == DATE
        assert 0x8825 not in exif and not exif.get_ifd(0x8825)
        assert not {0xA430, 0xA431, 0xA435} & set(sub)
    data = (out / "sub" / "b.protected.jpg").read_bytes()
    assert b"SERIAL" not in data and b"Jane Doe" not in data
    with Image.open(out / "c.protected.jpg") as image:
        assert estimate_jpeg_quality(image.quantization) == 90  # at least 90
    assert set(by_name["b.jpg"].exif_removed) >= {"GPS", "BodySerialNumber", "LensSerialNumber", "CameraOwnerName"}

    records = records_by_id(home)
    for r in results:
        record = records[r.record_id]
        assert record.file_name == r.source.name
        assert record.original_sha256 == originals[r.source]
        assert record.protected_sha256 == sha(r.output)
        assert record.rgan_key_id == show_keys(home, "alice")["active_key_id"]
        assert record.model_sha256 == db.file_sha256(DEFAULT_MODEL_PATH)
        assert record.params["protect_info"]["working_size"] == list(r.working_size)
        assert record.params["format"] == r.format and record.params["max_side"] == 2048
        working = pipeline.working_copy(read_image(r.source))
        assert record.psnr == pytest.approx(image_psnr(read_image(r.output), working), abs=1e-6)
        assert 20 < record.psnr < 60
    assert {p: sha(p) for p in originals} == originals  # originals untouched
    assert verify_log(home).ok


def test_max_side_downscales_and_an_existing_output_is_refused_unless_overwrite(home, photos):
    src = photos / "a.png"
    [first] = protect_paths(home, "alice", PW, [src], options=ProtectOptions(max_side=64))
    assert first.ok and first.output == photos / "a.protected.png"
    assert (first.original_size, first.working_size) == ((160, 120), (64, 48))
    with Image.open(first.output) as image:
        assert image.size == (64, 48)
    kept = sha(first.output)
    [again] = protect_paths(home, "alice", PW, [src])
    assert "already exists" in again.error and "--overwrite" in again.error
    assert sha(first.output) == kept
    [replaced] = protect_paths(home, "alice", PW, [src], overwrite=True)
    assert replaced.ok and replaced.working_size == (160, 120) and sha(src) != sha(replaced.output)
    # an explicit input that is itself an output gets its own output, never its input's name
    [twice] = protect_paths(home, "alice", PW, [replaced.output])
    assert twice.output == photos / "a.protected.protected.png"


def test_bad_files_fail_alone_with_clear_messages_and_leave_nothing_behind(home, tmp_path, monkeypatch):
    folder = tmp_path / "mixed"
    folder.mkdir()
    crop().save(folder / "good.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("hello")
    png = io.BytesIO()
    crop().save(png, "PNG")
    (folder / "truncated.png").write_bytes(png.getvalue()[:len(png.getvalue()) // 2])
    crop().save(folder / "animated.png", save_all=True, append_images=[crop(10, 10)])
    (tmp_path / "empty-folder").mkdir()
    count = len(records_by_id(home))
    results = protect_paths(home, "alice", PW, [folder, tmp_path / "missing.jpg", tmp_path / "empty-folder"])
    errors = {r.source.name: r.error for r in results}
    assert errors.pop("good.png") is None
    expected = {
        "animated.png": "animated", "empty.png": "empty file", "text.jpg": "not an image",
        "truncated.png": "not an image", "missing.jpg": "no such file", "empty-folder": "no images",
    }
    assert set(errors) == set(expected)
    for name, text in expected.items():
        assert name in errors[name] and text in errors[name], errors[name]
    assert [p.name for p in folder.iterdir() if ".protected" in p.name] == ["good.protected.png"]
    assert not list(tmp_path.rglob("*.tmp"))
    assert len(records_by_id(home)) == count + 1


def test_pixel_limit_refuses_decompression_bombs_before_decoding(home, tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    Image.new("RGB", (40, 30)).save(tmp_path / "huge.webp")  # 1,200 pixels
    Image.new("RGB", (30, 30)).save(tmp_path / "small.png")  # 900
    huge, small = protect_paths(home, "alice", PW, [tmp_path / "huge.webp", tmp_path / "small.png"])
    assert "40×30 pixels; at most 1,000" in huge.error and small.ok


def test_unwritable_output_folders(home, photos, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    [result] = protect_paths(home, "alice", PW, [photos / "a.png"], blocker / "out")
    assert "not a folder" in result.error
    if os.geteuid() != 0:  # root writes anywhere
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o500)
        [result] = protect_paths(home, "alice", PW, [photos / "a.png"], readonly)
        assert "read-only" in result.error


def test_other_formats_webp_heic_16_bit_and_grayscale(home, tmp_path):
    folder = tmp_path / "formats"
    folder.mkdir()
    crop().save(folder / "lossless.webp", lossless=True)
    crop().save(folder / "lossy.webp", quality=80)
    crop().save(folder / "phone.heic", quality=90)
    deep = (np.asarray(crop(), dtype=np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0132] = DATE
    (folder / "deep.png").write_bytes(encode_image(deep, "PNG", exif=exif.tobytes()))
    crop().convert("L").save(folder / "grey.png")
    results = {r.source.name: r for r in protect_paths(home, "alice", PW, [folder])}
    assert all(r.ok for r in results.values()), [r.error for r in results.values()]
    assert webp_lossless(results["lossless.webp"].output.read_bytes())
    assert not webp_lossless(results["lossy.webp"].output.read_bytes())
    with Image.open(results["phone.heic"].output) as image:
        assert (image.format, image.size) == ("HEIF", (160, 120))
    protected_deep = read_image(results["deep.png"].output)
    assert protected_deep.dtype == np.uint16 and protected_deep.shape == (120, 160, 3)
    with Image.open(results["deep.png"].output) as image:
        assert image.getexif()[0x0132] == DATE
    with Image.open(results["grey.png"].output) as image:
        assert image.mode == "RGB"  # protected in colour; recovery gives grey back
    [recovered] = recover_paths(home, [results["grey.png"].output], passphrase=PW)
    with Image.open(recovered.output) as image:
        assert (image.mode, image.size) == ("L", (160, 120))


# ---------------------------------------------------------------- recover

def test_recover_by_exact_hash_and_from_a_recompressed_copy(home, photos, tmp_path):
    results = protect_paths(home, "alice", PW, [photos / "a.png", photos / "sub" / "b.jpg"], tmp_path / "p")
    # a folder of protected photos: every one is recovered, the outputs are not taken for inputs
    recovered_all = recover_paths(home, [tmp_path / "p"], passphrase=PW)
    assert [r.source for r in recovered_all] == [r.output for r in results]
    for r, rec in zip(results, recovered_all):
        assert rec.ok and rec.matched_by == "sha256" and rec.record_id == r.record_id and rec.user == "alice"
        assert rec.output == r.output.parent / f"{r.source.stem}.recovered.png"
        working = pipeline.working_copy(read_image(r.source))
        recovered = read_image(rec.output)
        assert recovered.shape == working.shape  # size and orientation of the working original
        assert image_psnr(recovered, working) > image_psnr(read_image(r.output), working)
    copy = tmp_path / "platform-copy.jpg"
    with Image.open(results[0].output) as image:
        image.save(copy, quality=85)
    [rec] = recover_paths(home, [copy], tmp_path / "r", PW)
    assert rec.ok and rec.matched_by == "phash" and rec.record_id == results[0].record_id
    assert rec.output == tmp_path / "r" / "platform-copy.recovered.png" and "look-alike" in rec.note
    [original] = recover_paths(home, [photos / "a.png"], tmp_path / "r", PW)
    assert "is the original of record" in original.error


def test_a_protected_png_carries_its_sealed_field(home, photos, tmp_path):
    """The PNG output carries the field it was protected with, sealed with the user's key, and
    recovery subtracts it (exact on any machine; `test_refine.py` recovers one under another
    machine's arithmetic); a JPEG output carries none."""
    done, jpeg = protect_paths(home, "alice", PW, [photos / "a.png", photos / "c.jpg"], tmp_path / "p")
    sealed = images.png_chunk(done.output.read_bytes(), images.FIELD_CHUNK)
    assert sealed is not None and sealed.startswith(b"RFS1")
    assert jpeg.ok and b"RFS1" not in jpeg.output.read_bytes()
    [rec] = recover_paths(home, [done.output], tmp_path / "r", PW)
    assert rec.ok and rec.note is None
    assert np.array_equal(read_image(rec.output), pipeline.working_copy(read_image(photos / "a.png")))


def test_an_image_without_record_needs_a_user_and_force(home, tmp_path):
    stranger = tmp_path / "stranger.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(stranger)
    for user in (None, "alice"):
        [result] = recover_paths(home, [stranger], passphrase=PW, user=user)
        assert "no record of this image" in result.error and "--user NAME --force" in result.error
        assert not (tmp_path / "stranger.recovered.png").exists()
    [result] = recover_paths(home, [stranger], passphrase=PW, user="alice", force=True)
    assert result.ok and result.matched_by == "user" and "active key" in result.note
    with Image.open(result.output) as image:
        assert image.size == (80, 64)


def test_wrong_passphrase_and_unknown_user(home, photos):
    with pytest.raises(KeyStoreError, match="wrong passphrase for user 'alice'"):
        protect_paths(home, "alice", "wrong", [photos / "a.png"])
    with pytest.raises(ServiceError, match="unknown user 'nobody'"):
        protect_paths(home, "nobody", PW, [photos / "a.png"])
    [result] = protect_paths(home, "alice", PW, [photos / "a.png"])
    [rec] = recover_paths(home, [result.output], passphrase="wrong")
    assert "wrong passphrase" in rec.error
    assert not list(photos.glob("*.recovered.*"))


def test_a_second_agent_process_and_a_locked_log_get_clear_errors(home, photos, monkeypatch):
    monkeypatch.setattr(service_home, "LOCK_WAIT", 0.1)
    with open(home / service_home.LOCK_NAME, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: as another process would
        with pytest.raises(AgentBusyError, match="another agent process"):
            protect_paths(home, "alice", PW, [photos / "a.png"])
    monkeypatch.setattr(service_home, "DB_TIMEOUT", 0.2)
    other = sqlite3.connect(db.database_path(home), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(DatabaseLockedError, match="locked by another process"):
            protect_paths(home, "alice", PW, [photos / "a.png"])
    finally:
        other.close()
    assert not list(photos.glob("*.protected.*"))


# ---------------------------------------------------------------- the log

def test_log_records_decrypt_names_only_with_the_passphrase(tmp_path, photos):
    home = make_home(tmp_path)
    [result] = protect_paths(home, None, PW, [photos / "a.png"])
    listing = log_records(home)
    assert [r.file_name for r in listing.records] == [None] and listing.locked == ("alice",)
    listing = log_records(home, PW)
    assert [(r.id, r.file_name) for r in listing.records] == [(result.record_id, "a.png")]
    assert log_records(home, "wrong").locked == ("alice",)
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert log_records(home, PW, since=later).records == []
    with pytest.raises(ServiceError, match="agent init"):
        log_records(tmp_path / "nowhere")


def test_a_tampered_record_is_named_by_verify_and_check(tmp_path, photos):
    home = make_home(tmp_path)
    first, second = protect_paths(home, None, PW, [photos / "a.png", photos / "c.jpg"])
    assert verify_log(home).ok
    with sqlite3.connect(db.database_path(home)) as connection:
        connection.execute("UPDATE protections SET psnr = 99.0 WHERE id = ?", (first.record_id,))
    report = verify_log(home)
    assert not report.ok and [p.record_id for p in report.altered] == [first.record_id]
    checked = check_image(home, first.output)
    assert checked.protected and checked.authentic is False
    assert check_image(home, second.output).authentic is True


def _tamper(home: Path, record_id: str, how: str) -> None:
    with sqlite3.connect(db.database_path(home)) as connection:
        if how == "params":
            # the colour photo's record made to say grayscale: a "recovery" in grey
            (text,) = connection.execute("SELECT params FROM protections WHERE id = ?", (record_id,)).fetchone()
            assert '"RGB"' in text
            connection.execute("UPDATE protections SET params = ? WHERE id = ?",
                               (text.replace('"RGB"', '"L"'), record_id))
        elif how == "psnr":
            connection.execute("UPDATE protections SET psnr = 99.0 WHERE id = ?", (record_id,))
        elif how == "key id":
            connection.execute("UPDATE protections SET rgan_key_id = 'ffffffffffffffff' WHERE id = ?", (record_id,))
        else:
            connection.execute("DELETE FROM protections WHERE id = ?", (record_id,))


@pytest.mark.parametrize("how", ["params", "psnr", "key id", "deleted"])
def test_a_tampered_record_is_refused_by_recover_check_and_log(tmp_path, photos, how):
    """Issue 18: recovery, check and the log each verify the record they use."""
    home = make_home(tmp_path)
    first, second = protect_paths(home, None, PW, [photos / "a.png", photos / "c.jpg"])
    _tamper(home, first.record_id, how)
    out = tmp_path / "out"
    [refused, fine] = recover_paths(home, [first.output, second.output], out, PW)
    assert fine.ok and not refused.ok and sorted(p.name for p in out.iterdir()) == ["c.recovered.png"]
    listing = log_records(home)
    checked = check_image(home, first.output)
    if how == "deleted":
        assert "no record of this image" in refused.error and not checked.protected
        assert [p.kind for p in listing.problems] == ["removed"] and listing.unverified == {}
    else:
        assert f"record {first.record_id}" in refused.error and "does not verify" in refused.error
        assert checked.authentic is False and first.record_id in checked.problem and checked.self_check_asr is None
        assert list(listing.unverified) == [first.record_id]
        assert [r["verifies"] for r in listing.to_dict()["records"]] == [False, True]
    assert check_image(home, second.output).authentic is True


def test_a_rerun_removes_the_temporary_files_a_killed_run_left(tmp_path, photos):
    home = make_home(tmp_path)
    left = photos / ".a.protected.png.0123456789ab.tmp"  # killed between writing and renaming
    left.write_bytes(b"")
    [result] = protect_paths(home, None, PW, [photos / "a.png"])
    assert result.ok and not left.exists() and result.output.exists()
    stale = photos / ".a.recovered.png.0123456789ab.tmp"  # recovery holds no lock: only old ones
    stale.write_bytes(b"")
    fresh = photos / ".a.recovered.png.ba9876543210.tmp"
    fresh.write_bytes(b"")
    os.utime(stale, (1, 1))
    [recovered] = recover_paths(home, [result.output], passphrase=PW)
    assert recovered.ok and not stale.exists() and fresh.exists()


def test_an_altered_public_key_in_a_key_file_is_named(tmp_path, photos):
    """Issue 18: `keys show` complains, and `log verify` blames the key file, not the users table."""
    import base64
    import json

    home = make_home(tmp_path)
    protect_paths(home, None, PW, [photos / "a.png"])
    assert show_keys(home)["warning"] is None
    path = home / "keys" / "alice.key"
    doc = json.loads(path.read_text())
    doc["public"]["signing_key"] = base64.b64encode(bytes(32)).decode()
    path.write_text(json.dumps(doc, indent=2))
    shown = show_keys(home)
    assert str(path) in shown["warning"] and "not the one the log holds" in shown["warning"]
    [problem] = verify_log(home).of_kind("key")
    assert f"the key file {path} was altered or replaced" in problem.detail


def test_recovering_another_users_photo_as_yourself_is_refused(tmp_path, photos):
    home = make_home(tmp_path)
    add_user(home, "bob", PW, kdf_n=KDF)
    [mine] = protect_paths(home, "alice", PW, [photos / "a.png"])
    [result] = recover_paths(home, [mine.output], tmp_path / "out", PW, user="bob")
    assert not result.ok and "user 'alice' protected this image, not 'bob'" in result.error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    [result] = recover_paths(home, [mine.output], tmp_path / "out", PW, user="bob", force=True)
    assert not result.ok  # --force is for photos with no record, never for another user's
    [result] = recover_paths(home, [mine.output], tmp_path / "out", PW, user="alice")
    assert result.ok and result.user == "alice"


def test_check_image_says_who_protected_it_and_when(tmp_path, photos):
    home = make_home(tmp_path)
    [result] = protect_paths(home, None, PW, [photos / "a.png"])
    checked = check_image(home, result.output)
    assert checked.protected and checked.matched_by == "sha256" and checked.authentic
    assert checked.record.user == "alice" and checked.record.id == result.record_id and checked.record.time
    fooled = checked.record.params["self_check"]["fooled"]
    assert checked.record.self_check_asr == len(fooled) / 2
    assert checked.self_check_asr == checked.record.self_check_asr  # the very file: the same labels
    original = check_image(home, photos / "a.png")
    assert not original.protected and original.original_of.id == result.record_id
    stranger = check_image(home, photos / "c.jpg")
    assert not stranger.protected and stranger.record is None and stranger.original_of is None
    with pytest.raises(ServiceError, match="not an image"):
        check_image(home, photos / "notes.txt")
    with pytest.raises(images.ImageError, match="no such file"):
        check_image(home, photos / "missing.png")


def test_jpeg_quality_estimate_is_exact_for_libjpeg_files():
    for quality in (10, 50, 75, 90, 97, 100):
        buffer = io.BytesIO()
        crop(w=32, h=32).save(buffer, "JPEG", quality=quality)
        with Image.open(buffer) as image:
            assert estimate_jpeg_quality(image.quantization) == quality


# ---------------------------------------------------------------- where the home is


def test_agent_home_honours_agent_home(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENT_HOME", str(tmp_path / "home"))
    assert service_home.agent_home() == tmp_path / "home"
    assert keystore.key_store(service_home.agent_home()) == tmp_path / "home" / "keys"


@pytest.mark.parametrize("platform, env, expected", [
    ("linux", {}, "~/.local/share/rgan-agent"),
    ("linux", {"XDG_DATA_HOME": "/data/x"}, "/data/x/rgan-agent"),
    ("linux", {"XDG_DATA_HOME": "relative"}, "~/.local/share/rgan-agent"),
    ("darwin", {}, "~/Library/Application Support/rgan-agent"),
    ("win32", {"APPDATA": "/c/Users/a/AppData/Roaming"}, "/c/Users/a/AppData/Roaming/rgan-agent"),
])
def test_agent_home_platform_defaults(monkeypatch, tmp_path, platform, env, expected):
    monkeypatch.delenv("AGENT_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "platform", platform)
    assert service_home.agent_home() == Path(expected.replace("~", str(tmp_path)))
