"""A messy photo folder is not bad input: the two folder readers (datasets/folder.py for
the arrays recipes, the stream experiment's scanner; both on experiments/image_folder.py's
rules) keep and skip the same files for the same reasons, and every kept file reads alike in
ImageDataGenerator, tf.data and the arrays.

Each kind of file below was tried on all three readers (TensorFlow 2.21, Pillow 13); the
comment says why it is kept or skipped.
"""
import io
import os
import shutil
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from datasets import folder

S = 12  # every image is S x S, so no loader resizes and pixels compare directly


def rgb(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (S, S, 3), np.uint8))


def encoded(image, **save):
    buffer = io.BytesIO()
    image.save(buffer, **save)
    return buffer.getvalue()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(bit_depth, colour_type, rows, idat=None, size=(S, S)):
    header = struct.pack(">IIBBBBB", *size, bit_depth, colour_type, 0, 0, 0)
    idat = idat if idat is not None else zlib.compress(b"".join(b"\0" + row for row in rows))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def raw_bmp(bits, compression, palette, pixels, header_size=40, masks=b""):
    info = struct.pack("<IiiHHIIiiII", header_size, S, S, 1, bits, compression, len(pixels),
                       2835, 2835, len(palette) // 4, 0) + masks
    info += bytes(header_size - len(info))
    offset = 14 + header_size + len(palette)
    return (b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette
            + pixels)


def os2_bmp():  # a 12-byte BITMAPCOREHEADER
    info = struct.pack("<IHHHH", 12, S, S, 1, 24)
    pixels = np.asarray(rgb(1))[::-1, :, ::-1].tobytes()
    return b"BM" + struct.pack("<IHHI", 26 + len(pixels), 0, 0, 26) + info + pixels


GRAY_PALETTE = b"".join(bytes((v, v, v, 0)) for v in range(256))
PNG = encoded(rgb(2), format="PNG")
JPEG = encoded(rgb(3), format="JPEG", quality=95)


def with_bad_idat_checksum(png):
    data = bytearray(png)
    data[data.index(b"IEND") - 5] ^= 0xFF  # the last byte of IDAT's checksum
    return bytes(data)


def exif_rotated():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": no loader applies it, so all three agree
    return encoded(rgb(4), format="JPEG", exif=exif)


def palette_with_transparency():
    image = rgb(5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encoded(image, format="PNG", transparency=0)


def bmp32_bitfields():  # GIMP's layout: a V5 header with BGRA masks
    bgra = np.concatenate([np.asarray(rgb(6))[..., ::-1], np.full((S, S, 1), 255, np.uint8)], -1)
    masks = struct.pack("<IIII", 0xFF0000, 0xFF00, 0xFF, 0xFF000000)
    return raw_bmp(32, 3, b"", bgra[::-1].tobytes(), header_size=124, masks=masks)


def twelve_bit_jpeg():
    data = bytearray(JPEG)
    data[data.index(b"\xff\xc0") + 4] = 12  # the frame header's sample precision
    return bytes(data)


# Read alike by ImageDataGenerator, tf.data and the arrays (relative path: bytes).
KEPT = {
    "plain.jpg": JPEG,
    "with space.jpg": encoded(rgb(7), format="JPEG"),
    "café ü.jpg": encoded(rgb(8), format="JPEG"),
    "日本語.png": encoded(rgb(9), format="PNG"),
    "new\nline.jpg": encoded(rgb(10), format="JPEG"),  # a control character in the name
    "UPPER.JPG": encoded(rgb(11), format="JPEG"),
    "x" * 200 + ".jpg": encoded(rgb(12), format="JPEG"),
    "gray.jpg": encoded(rgb(13).convert("L"), format="JPEG"),
    "cmyk.jpg": encoded(rgb(14).convert("CMYK"), format="JPEG"),
    "progressive.jpg": encoded(rgb(15), format="JPEG", progressive=True),
    "exif_rotated.jpg": exif_rotated(),
    "mpo.jpg": encoded(rgb(16), format="MPO", save_all=True, append_images=[rgb(17)]),
    "png_data.jpg": encoded(rgb(18), format="PNG"),  # both loaders go by content
    "jpeg_data.png": encoded(rgb(19), format="JPEG"),
    "rgba.png": encoded(rgb(20).convert("RGBA"), format="PNG"),
    "gray_alpha.png": encoded(rgb(21).convert("LA"), format="PNG"),
    "palette.png": encoded(rgb(22).convert("P"), format="PNG"),
    "palette_transparent.png": palette_with_transparency(),
    "one_bit.png": encoded(rgb(23).convert("1"), format="PNG"),
    "rgb16.png": raw_png(16, 2, [np.random.default_rng(24).integers(0, 65536, S * 3, np.uint16)
                                 .astype(">u2").tobytes() for _ in range(S)]),
    "animated.png": encoded(rgb(25), format="PNG", save_all=True, append_images=[rgb(26)]),
    "rgb.bmp": encoded(rgb(27), format="BMP"),
    "rgba.bmp": encoded(rgb(28).convert("RGBA"), format="BMP"),
    "gray.bmp": encoded(rgb(29).convert("L"), format="BMP"),
    "top_down.bmp": raw_bmp(24, 0, b"", np.asarray(rgb(30))[..., ::-1].tobytes()).replace(
        struct.pack("<ii", S, S), struct.pack("<ii", S, -S), 1),
    "bitfields.bmp": bmp32_bitfields(),
    "dir.jpg/inside.jpg": encoded(rgb(31), format="JPEG"),  # a folder named x.jpg is a folder
    "sub/deeper/deep.jpg": encoded(rgb(32), format="JPEG"),
}
# Skipped and listed with a reason by both readers.
SKIPPED = {
    "zero.jpg": b"",
    "text.jpg": b"this is a text file, not a JPEG\n",
    "truncated.jpg": JPEG[: len(JPEG) // 2],
    "truncated.png": PNG[:-30],
    "no_iend.png": PNG[:-12],  # Pillow reads it; tf.io.decode_image fails
    "bad_idat_checksum.png": with_bad_idat_checksum(PNG),  # ditto
    "gif_data.jpg": encoded(rgb(33), format="GIF"),
    "webp_data.jpg": encoded(rgb(34), format="WEBP"),
    "tiff_data.jpg": encoded(rgb(35), format="TIFF"),  # tf.io.decode_image cannot read TIFF
    "twelve_bit.jpg": twelve_bit_jpeg(),
    # side^2 > 2 * Image.MAX_IMAGE_PIXELS: Pillow raises DecompressionBombError on opening it
    "bomb.png": raw_png(8, 0, None, idat=zlib.compress(bytes(4 * 14001)), size=(14000, 14000)),
    # Pillow clips 16-bit grey to white, tf.io.decode_image scales it: different images
    "gray16.png": raw_png(16, 0, [np.random.default_rng(36).integers(0, 65536, S, np.uint16)
                                  .astype(">u2").tobytes() for _ in range(S)]),
    # tf.io.decode_image reads this one's palette indices as grey levels
    "palette.bmp": encoded(rgb(37).convert("P"), format="BMP"),
    # Pillow reads these; tf.io.decode_image raises
    "one_bit.bmp": encoded(rgb(38).convert("1"), format="BMP"),
    "rle8.bmp": raw_bmp(8, 1, GRAY_PALETTE, bytes((S, 7, 0, 0)) * S + b"\0\1"),
    "rle4.bmp": raw_bmp(4, 2, GRAY_PALETTE[:64], bytes((S, 0x3C, 0, 0)) * S + b"\0\1"),
    "sixteen_bit.bmp": raw_bmp(16, 0, b"", np.random.default_rng(42).integers(
        0, 1 << 15, S * S, np.uint16).astype("<u2").tobytes()),
    "os2.bmp": os2_bmp(),
}
# Neither kept nor listed: other extensions, hidden files and folders.
IGNORED = {
    "real.gif": encoded(rgb(39), format="GIF"),
    "real.webp": encoded(rgb(40), format="WEBP"),
    "notes.txt": b"notes\n",
    ".DS_Store": b"\0\0\0\1Bud1",
    "._plain.jpg": b"\0\5\26\7 AppleDouble",
    ".hidden/h.jpg": JPEG,
}


def answer_readers_of(fifo):
    """Opens fifo for writing, again and again, in a daemon thread: a reader that opens
    it reads an empty file instead of blocking forever, so a reader that opens what is not
    a regular file fails these tests instead of hanging them."""
    def answer():
        while True:
            with open(fifo, "wb"):
                pass

    threading.Thread(target=answer, daemon=True).start()


def write_messy_folder(root):
    """root/a/ holds every kind of file; root/b/ a few plain ones. Returns (kept, skipped):
    sets of (relative path, class index), paths printable as the readers report them."""
    kept, skipped = set(), set()
    for names, into in ((KEPT, kept), (SKIPPED, skipped), (IGNORED, None)):
        for name, data in names.items():
            path = root / "a" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if into is not None:
                into.add((folder.printable(f"a/{name}"), 0))  # as the readers report it
    for name, image_format in (("0.jpg", "JPEG"), ("sub/1.png", "PNG")):
        (root / "b" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "b" / name).write_bytes(encoded(rgb(41), format=image_format))
        kept.add((f"b/{name}", 1))
    (root / "b" / "empty.png").write_bytes(b"")
    skipped.add(("b/empty.png", 1))
    os.symlink(root / "a" / "plain.jpg", root / "a" / "link.jpg")  # followed: a file
    kept.add(("a/link.jpg", 0))
    os.symlink(root / "a" / "nowhere.jpg", root / "a" / "dangling.jpg")
    skipped.add(("a/dangling.jpg", 0))
    if hasattr(os, "mkfifo"):  # opening a FIFO blocks until someone writes to it
        os.mkfifo(root / "a" / "pipe.jpg")
        answer_readers_of(root / "a" / "pipe.jpg")
        skipped.add(("a/pipe.jpg", 0))
    try:  # a name that is not UTF-8: tf.constant of the path fails
        with open(os.fsencode(root / "a") + b"/latin1_\xe9t\xe9.jpg", "wb") as f:
            f.write(JPEG)
        skipped.add((r"a/latin1_\xe9t\xe9.jpg", 0))
    except OSError:  # a file system that takes only UTF-8 names
        pass
    return kept, skipped


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    kept, skipped = write_messy_folder(root)
    return root, kept, skipped


def relative(root, path):
    return folder.printable(os.path.relpath(path, root))


def test_both_readers_keep_and_skip_the_same_files_for_the_same_reasons(stream, messy):
    root, kept, skipped = messy
    config = stream.Config(image_size=S)
    train, val, stream_skipped, hidden = stream.find_images(root, None, config)
    stream_kept = {(relative(root, p), label) for scan in (train, val)
                   for p, label in zip(scan.paths, scan.labels)}
    _, labels, paths, folder_skipped = folder.read_arrays(root, S, 3)
    folder_kept = {(relative(root, p), int(label)) for p, label in zip(paths, labels)}
    assert stream_kept == folder_kept == kept
    stream_reasons = {relative(root, p): reason for p, reason in stream_skipped}
    folder_reasons = {relative(root, p): reason for p, reason in folder_skipped}
    assert stream_reasons == folder_reasons
    assert set(stream_reasons) == {name for name, _ in skipped}
    assert hidden == 3  # .DS_Store, ._plain.jpg and the .hidden folder
    for path, reason in stream_skipped + folder_skipped:  # one printable line each
        assert path.isprintable() and reason.isprintable(), (path, reason)
        assert "object at 0x" not in reason, reason
    assert "tf.io.decode_image" in stream_reasons["a/rle8.bmp"]
    assert stream_reasons["a/dangling.jpg"] == "broken symbolic link"


def test_every_kept_file_reads_alike_in_the_generator_tf_data_and_arrays(stream, stream_dropin, messy,
                                                                         tmp_path):
    from experiments.image_folder import scan_folder
    root, kept, _ = messy
    scan = scan_folder(root, S)
    n = len(scan.paths)
    assert n == len(kept)
    generator = stream_dropin.generator_flow(stream.link_tree(scan, tmp_path / "view"), scan.class_names,
                                      S, batch_size=n, shuffle=False)
    x_gen, y_gen = generator[0]
    dataset, _ = stream_dropin.tf_data_pipeline(scan.paths, scan.labels, S, n, training=False)
    batches = [(np.asarray(x), np.asarray(y)) for x, y in dataset.take(1)]
    assert len(batches) == 1 and batches[0][0].shape == (n, S, S, 3)  # no batch was dropped
    x_tf, y_tf = batches[0]
    x_arrays, y_arrays, paths, _ = folder.read_arrays(root, S, 3)
    assert paths == scan.paths
    np.testing.assert_array_equal(y_gen.astype(int), y_tf)
    np.testing.assert_array_equal(y_tf, y_arrays)
    # JPEG decoders differ by a level or two; a misread file (palette indices, clipped
    # 16-bit grey) differs by tens of levels.
    for name, x in (("generator", x_gen), ("arrays", x_arrays / 255)):
        per_image = np.abs(x - x_tf).mean(axis=(1, 2, 3)) * 255
        worst = int(per_image.argmax())
        assert per_image[worst] < 4, (name, scan.paths[worst], per_image[worst])
    gray, _, gray_paths, _ = folder.read_arrays(root, S, 1)
    assert gray.shape == (n, S, S, 1) and gray_paths == paths


def test_directory_dataset_loads_the_kept_files_and_names_each_skipped_one_with_its_reason(
        messy, capsys):
    import datasets
    root, kept, skipped = messy
    (x, _), (x_val, _) = datasets.load("directory", root, image_size=S, channels=3)
    assert len(x) + len(x_val) == len(kept)
    _, found = folder.load(root, S, 3)
    assert len(found) == len(skipped)
    zero = next(entry for entry in found if entry.path.endswith("a/zero.jpg"))
    assert str(zero) == f"{zero.path}: empty file (0 bytes)"
    printed = capsys.readouterr().out
    assert f"skipped {len(skipped)} unreadable image(s), e.g. {found[0].path}: " in printed


def write_plain_tree(root, classes=("cats", "dogs"), per_class=3):
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.jpg").write_bytes(encoded(rgb(10 * label + i), format="JPEG"))
    return root


def add_bad_file_with_a_newline_in_its_name(root):
    (root / "dogs" / "bad\nname.jpg").write_bytes(b"not a jpeg")


def remove_a_class(root):
    shutil.rmtree(root / "dogs")


def add_empty_class(root):
    (root / "birds").mkdir()
    (root / "birds" / ".DS_Store").write_bytes(b"\0")
    (root / "birds" / "zero.jpg").write_bytes(b"")


BAD_INPUTS = {  # name: (change to a good tree, Config fields, expected text)
    "missing_folder": (shutil.rmtree, {}, "data does not exist or is not a folder"),
    "one_class": (remove_a_class, {}, "1 class folder(s) (cats); classification needs"),
    "empty_class": (add_empty_class, {}, "data/birds has no readable images"),
    "bad_file_with_fail": (add_bad_file_with_a_newline_in_its_name, {"on_bad_image": "fail"},
                           r"dogs/bad\nname.jpg (not an image file Pillow can identify)"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_check_rejects_unusable_folders_with_one_line_before_training(stream, tmp_path, case):
    change, overrides, expected = BAD_INPUTS[case]
    root = write_plain_tree(tmp_path / "data")
    change(root)
    with pytest.raises(ValueError) as raised:
        stream.check(stream.Config(image_size=S, **overrides), (root, None))
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and expected in message, message


def test_check_reads_the_folder_once_until_a_file_in_it_changes(stream, tmp_path, monkeypatch):
    root = write_plain_tree(tmp_path / "data")
    scans, real_scan = [], stream.scan_folder

    def counted_scan(*args, **kwargs):
        scans.append(args)
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(stream, "scan_folder", counted_scan)
    config = stream.Config(image_size=S)
    first = stream.check(config, (root, None))
    assert stream.check(config, (root, None)) is first and len(scans) == 1
    (root / "cats" / "0.jpg").write_bytes(b"rewritten, no longer a JPEG")
    train, val, skipped, _ = stream.check(config, (root, None))
    assert len(scans) == 2 and [p for p, _ in skipped] == [str(root / "cats" / "0.jpg")]
    assert len(train.paths) + len(val.paths) == 5
    stream.check(stream.Config(image_size=S, seed=1), (root, None))  # another split: a rescan
    assert len(scans) == 3
