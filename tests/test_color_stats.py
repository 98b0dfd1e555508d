"""The colour-statistics chunk (colr): encoder option, file format, decoder colour fix, info.

The published arithmetic itself is checked against NeFIC's vectors in
tests/test_nefic_conformance.py; here the chunk's life in ulbc's own files.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ulbcodec import bitstream
from ulbcodec.bitstream import BitstreamError, Container
from ulbcodec.cli import cli
from ulbcodec.color_stats import ColorStats

pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def _stats_error(rgb, original):
    ours, theirs = (np.array(ColorStats.of_rgb(x).mean + ColorStats.of_rgb(x).std) for x in (rgb, original))
    return np.abs(ours - theirs).max() / 65535


def test_chunk_is_optional_counted_and_applied(tiny_codec, photo):
    rgb = photo[:96, :128]
    assert tiny_codec.color_stats_default is True
    with_stats = tiny_codec.encode(rgb, 1)  # on by default
    plain = tiny_codec.encode(rgb, 1, color_stats=False)
    assert not Container.from_bytes(plain.data).find(bitstream.CHUNK_COLOR)
    chunks = Container.from_bytes(with_stats.data).find(bitstream.CHUNK_COLOR)
    assert len(chunks) == 1 and len(chunks[0].payload) == 12
    assert len(with_stats.data) == len(plain.data) + chunks[0].size == len(plain.data) + 21  # counted in the bpp
    assert ColorStats.from_bytes(chunks[0].payload) == ColorStats.of_rgb(rgb)

    before, after = tiny_codec.decode(plain.data), tiny_codec.decode(with_stats.data)
    assert np.array_equal(tiny_codec.decode(with_stats.data, color_fix=False), before)  # files without: as before
    assert not np.array_equal(after, before)
    assert _stats_error(after, rgb) < _stats_error(before, rgb)


def test_bad_chunk_is_refused_in_one_line(tiny_codec, photo):
    data = tiny_codec.encode(photo[:64, :64], 0, color_stats=False)
    container = Container.from_bytes(data.data)
    for payload, message in ((b"\x00" * 11, "colr chunk of 11 bytes, expected 12"),
                             (b"\x80\x00" * 3 + b"\x00\x00" * 3, "zero standard deviation")):
        bad = Container(container.header, container.chunks + [bitstream.Chunk(bitstream.CHUNK_COLOR, payload)])
        with pytest.raises(BitstreamError, match=message):
            tiny_codec.decode(bad.to_bytes())
    twice = Container(container.header, container.chunks + [bitstream.Chunk(bitstream.CHUNK_COLOR,
                                                                            ColorStats.of_rgb(photo).to_bytes())] * 2)
    with pytest.raises(BitstreamError, match="at most one colr chunk"):
        tiny_codec.decode(twice.to_bytes())


def test_cli_flag_and_info(tiny_model, photo, tmp_path):
    Image.fromarray(photo[:64, :96]).save(tmp_path / "a.png")
    for flag, expect in (([], True), (["--color-stats"], True), (["--no-color-stats"], False)):
        out = tmp_path / f"a{len(flag)}{expect}.ulb"
        r = _invoke(["encode", tmp_path / "a.png", "-o", out, "--model", "tiny", "--quality", "1", *flag])
        assert r.exit_code == 0, r.output
        desc = json.loads(_invoke(["info", out, "--json"]).stdout)
        assert ("color_stats" in desc) is expect
        assert [c["type"] for c in desc["chunks"]].count("colr") == int(expect)
        if expect:
            assert _invoke(["info", out]).stdout.count("color stats") == 1
            assert _invoke(["decode", out, "-o", tmp_path / "a.png", "--model", "tiny", "-f"]).exit_code == 0
