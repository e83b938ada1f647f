"""``fine-infer index`` / ``search`` on text catalogues (.jsonl, .txt) and image folders, with real tiny bundles.

The bundles are the trained tiny Fashion-FINE towers exported one graph each (a text bundle, an image bundle), so a
catalogue of the wrong modality meets a bundle that really lacks the graph. Commands run in-process
(``fine_infer.cli.main``); the progress-bar test runs one in a subprocess on a pseudo-terminal.
"""

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest
from PIL import Image

import fine_infer
from fine_infer.bundle import read_bundle
from fine_infer.cli import build_parser, main
from fine_infer.index import Index

# The index stores float32 vectors computed by the same ONNX Runtime session as the reference; only the batch
# composition differs (16 a call vs all at once), which moves float32 results by a few ulps.
ATOL = 1e-5

CATALOGUE = [
    {"id": 101, "text": "a red striped dress", "sku": "D-1", "price": 39.5},
    {"id": 7, "text": "blue denim jeans", "sku": "J-2", "tags": ["casual", "summer"]},
    {"id": 55, "text": "a black leather jacket", "sku": "K-3"},
    {"id": 12, "text": "white cotton shirt with a collar", "sku": "S-4", "stock": None},
]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """(text bundle, image bundle): the tiny trained Fashion-FINE text and image towers, one graph each."""
    from fine_infer.export import export_arch

    root = tmp_path_factory.mktemp("index-cli")
    for graph in ("text", "image"):
        export_arch("fashion-fine", root / graph, "tiny", pretrained=True, graphs=[graph])
    return root / "text", root / "image"


def cli(capsys, *args):
    """Run the command line in-process: (exit code, stdout, stderr)."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def write_jsonl(path, rows, blank_after=None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_catalogue_round_trips_ids_metadata_and_vectors(bundles, tmp_path, capsys):
    text_bundle, _ = bundles
    cat = write_jsonl(tmp_path / "cat.jsonl", CATALOGUE, blank_after=2)  # a blank line is skipped
    out = tmp_path / "cat.fidx"
    rc, stdout, err = cli(capsys, "index", text_bundle, cat, "--out", out, "--batch-size", 3)
    assert rc == 0, err
    assert stdout.startswith("indexed 4 texts") and "embed_text by graph 'text'" in stdout and err == ""

    index = Index.load(out)
    assert sorted(index.ids().tolist()) == [7, 12, 55, 101]
    for row in CATALOGUE:
        assert index.get_metadata(row["id"]) == {k: v for k, v in row.items() if k != "id"}
    session = fine_infer.load(text_bundle)
    want = session.embed_texts([r["text"] for r in CATALOGUE])
    got = index.get_vectors([r["id"] for r in CATALOGUE])
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert index.attrs["bundle"] == str(text_bundle.resolve())
    assert index.attrs["bundle_identity"] == read_bundle(text_bundle).manifest.identity()
    assert (index.attrs["task"], index.attrs["graph"]) == ("embed_text", "text")

    rc, stdout, err = cli(capsys, "search", out, "--text", "a black leather jacket", "--k", 2)
    assert rc == 0, err
    lines = stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("  1.  1.0000  id 55  \"a black leather jacket\"  sku=K-3")
    assert lines[1].startswith("  2. ") and " id " in lines[1] and "sku=" in lines[1]
    rc, stdout, _ = cli(capsys, "search", out, "--text", "blue denim jeans", "--k", 4)
    first = stdout.splitlines()[0]
    assert "id 7  \"blue denim jeans\"  sku=J-2  tags=[\"casual\", \"summer\"]" in first
    rc, stdout, _ = cli(capsys, "search", out, "--text", "white cotton shirt with a collar", "--k", 1, "--json")
    hit = json.loads(stdout)["hits"][0]
    assert hit["rank"] == 1 and hit["id"] == 12 and hit["score"] > 0.9999
    assert {k: hit[k] for k in ("text", "sku", "stock")} == {k: CATALOGUE[3][k] for k in ("text", "sku", "stock")}


def test_txt_catalogue_ids_are_sequential_over_non_blank_lines_and_add_extends(bundles, tmp_path, capsys):
    text_bundle, _ = bundles
    cat = tmp_path / "texts.txt"
    cat.write_text("a red dress\n\n   \nwhite sneakers\ngrey wool sweater\n")
    out = tmp_path / "t.fidx"
    rc, stdout, err = cli(capsys, "index", text_bundle, cat, "--out", out)
    assert rc == 0, err
    index = Index.load(out)
    texts = ["a red dress", "white sneakers", "grey wool sweater"]
    assert index.ids().tolist() == [0, 1, 2]
    assert [index.get_metadata(i) for i in range(3)] == [{"text": t} for t in texts]
    np.testing.assert_allclose(index.get_vectors([0, 1, 2]), fine_infer.load(text_bundle).embed_texts(texts),
                               atol=ATOL, rtol=0)

    more = tmp_path / "more.txt"
    more.write_text("navy wool coat\n")
    rc, stdout, err = cli(capsys, "index", text_bundle, more, "--out", out, "--add")
    assert rc == 0, err and "(4 items" in stdout
    assert Index.load(out).get_metadata(3) == {"text": "navy wool coat"}
    rc, stdout, err = cli(capsys, "index", text_bundle, more, "--out", out)
    assert rc == 2 and "already exists; pass --add" in err
    rc, stdout, err = cli(capsys, "index", text_bundle, more, "--out", out, "--force")
    assert rc == 0 and len(Index.load(out)) == 1
    rc, stdout, _ = cli(capsys, "search", out, "--text", "coat")
    assert stdout.splitlines() == ["  1.  " + stdout.split()[1] + "  id 0  \"navy wool coat\""]


LONG = "dress " * 60  # over the tiny text tower's 32 tokens

BAD_LINES = {
    "malformed JSON": ('{"id": 3, "text": "a coat"', "not valid JSON"),
    "missing text": ('{"id": 3, "title": "a coat"}', 'no "text" key (its keys: id, title)'),
    "duplicate id": ('{"id": 7, "text": "a coat"}', "id 7 is already used by cat.jsonl:2"),
    "string id": ('{"id": "3", "text": "a coat"}', '"id" must be an integer, got "3"'),
    "float id": ('{"id": 3.5, "text": "a coat"}', '"id" must be an integer, got 3.5'),
    "bool id": ('{"id": true, "text": "a coat"}', '"id" must be an integer, got true'),
    "id -1": ('{"id": -1, "text": "a coat"}', '"id" may not be -1'),
    "no id among ids": ('{"text": "a coat"}', 'no "id", while cat.jsonl:1 has one'),
    "empty text": ('{"id": 3, "text": "  "}', '"text" is empty'),
    "text not a string": ('{"id": 3, "text": 42}', '"text" is a number, not a string'),
    "not an object": ('["a coat"]', "an array, not a JSON object"),
    "NaN": ('{"id": 3, "text": "a coat", "price": NaN}', "NaN is not valid JSON"),
    "inf": ('{"id": 3, "text": "a coat", "price": 1e999}', "1e999 is out of the range of a float"),
    "5000 digits": ('{"id": 3, "text": "a coat", "n": ' + "1" * 5000 + "}", "not valid JSON here"),
    "nested 40 deep": ('{"id": 3, "text": "a coat", "n": ' + "[" * 40 + "]" * 40 + "}", "nested deeper than 32"),
    "nested 100000 deep": ('{"id": 3, "text": "a coat", "n": ' + "[" * 100_000 + "]" * 100_000 + "}",
                           "nested deeper than 32"),
    "line over 1 MiB": ('{"id": 3, "text": "a coat", "n": "' + "x" * (1 << 20) + '"}', "longer than 1 MiB"),
    "text over the limit": (json.dumps({"id": 3, "text": LONG}), "the text has 62 tokens; this model takes at most 32"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_each_bad_line_is_a_one_line_error_naming_it(bundles, tmp_path, capsys, case):
    text_bundle, _ = bundles
    line, needle = BAD_LINES[case]
    cat = tmp_path / "cat.jsonl"
    cat.write_text("\n".join([json.dumps(CATALOGUE[0]), json.dumps(CATALOGUE[1]), line, json.dumps(CATALOGUE[2])]))
    out = tmp_path / "x.fidx"
    rc, stdout, err = cli(capsys, "index", text_bundle, cat, "--out", out)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("fine-infer index: error: cat.jsonl:3: ") and needle in err, err
    assert "--skip-bad" in err and not out.exists()


def test_skip_bad_counts_and_lists_every_skipped_line(bundles, tmp_path, capsys):
    text_bundle, _ = bundles
    cat = tmp_path / "cat.jsonl"
    cat.write_text("\n".join([json.dumps(CATALOGUE[0]), BAD_LINES["malformed JSON"][0], json.dumps(CATALOGUE[1]),
                              BAD_LINES["text over the limit"][0], BAD_LINES["duplicate id"][0],
                              json.dumps(CATALOGUE[2])]) + "\n")
    out = tmp_path / "x.fidx"
    rc, stdout, err = cli(capsys, "index", text_bundle, cat, "--out", out, "--skip-bad")
    assert rc == 0, err
    lines = stdout.splitlines()
    assert "indexed 3 texts" in lines[0] and lines[0].endswith("; skipped 3 bad item(s):")
    assert [ln.split(":")[1] for ln in lines[1:]] == ["2", "4", "5"]  # in file order, each named
    assert lines[1].startswith("  skipped cat.jsonl:2: not valid JSON")
    assert lines[2].startswith("  skipped cat.jsonl:4: the text has 62 tokens")
    assert lines[3] == "  skipped cat.jsonl:5: id 7 is already used by cat.jsonl:3"
    assert sorted(Index.load(out).ids().tolist()) == [7, 55, 101]
    cat.write_text(BAD_LINES["empty text"][0] + "\n")
    rc, stdout, err = cli(capsys, "index", text_bundle, cat, "--out", tmp_path / "none.fidx", "--skip-bad")
    assert rc == 2 and "no item of" in err and not (tmp_path / "none.fidx").exists()


def test_a_catalogue_of_the_wrong_modality_is_a_one_line_error(bundles, tmp_path, capsys):
    text_bundle, image_bundle = bundles
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 32), "red").save(folder / "a.png")
    texts = tmp_path / "t.txt"
    texts.write_text("a red dress\n")
    rc, _, err = cli(capsys, "index", text_bundle, folder, "--out", tmp_path / "x.fidx")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "embeds no images (graphs: text [embed_text]): index a .jsonl or .txt catalogue" in err
    rc, _, err = cli(capsys, "index", image_bundle, texts, "--out", tmp_path / "x.fidx")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "embeds no texts (graphs: image [embed_image])" in err and "index a folder of images" in err
    rc, _, err = cli(capsys, "index", image_bundle, tmp_path / "cat.csv", "--out", tmp_path / "x.fidx")
    assert rc == 2 and "does not exist" in err


@pytest.fixture
def photos(tmp_path, rng):
    """Four random images (one in a sub-folder) and a corrupt one."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.jpg", "sub/d.png"):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def test_image_folder_with_a_corrupt_file_fails_or_skips_it_by_name(bundles, photos, tmp_path, capsys):
    _, image_bundle = bundles
    out = tmp_path / "p.fidx"
    rc, _, err = cli(capsys, "index", image_bundle, photos, "--out", out)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and not out.exists()
    assert err.startswith("fine-infer index: error: broken.png: not a readable image") and "--skip-bad" in err

    rc, stdout, err = cli(capsys, "index", image_bundle, photos, "--out", out, "--skip-bad", "--batch-size", 2)
    assert rc == 0, err
    assert "indexed 4 images" in stdout and "skipped 1 bad item(s):" in stdout
    assert "  skipped broken.png: not a readable image" in stdout
    index = Index.load(out)
    # ids follow the sorted paths a.png, b.png, broken.png, c.jpg, sub/d.png: broken.png's id 2 is left unused
    assert index.ids().tolist() == [0, 1, 3, 4]
    assert [index.get_metadata(i) for i in (0, 1, 3, 4)] == [{"path": p} for p in ("a.png", "b.png", "c.jpg",
                                                                                   "sub/d.png")]
    assert (index.attrs["task"], index.attrs["graph"]) == ("embed_image", "image")
    want = fine_infer.load(image_bundle).embed_images([photos / p for p in ("a.png", "b.png", "c.jpg", "sub/d.png")])
    np.testing.assert_allclose(index.get_vectors([0, 1, 3, 4]), want, atol=ATOL, rtol=0)
    rc, stdout, _ = cli(capsys, "search", out, "--image", photos / "sub" / "d.png", "--k", 1)
    assert stdout.startswith("  1.  1.0000  id 4  sub/d.png")


def test_jsonl_image_catalogue_paths_relative_to_the_file(bundles, photos, tmp_path, capsys):
    text_bundle, image_bundle = bundles
    cat = write_jsonl(photos.parent / "shop.jsonl", [
        {"id": 1, "image": "photos/a.png", "text": "a dress", "sku": "A"},
        {"id": 2, "image": "photos/broken.png", "sku": "B"},
        {"id": 3, "image": "photos/missing.png", "sku": "C"},
        {"id": 4, "image": "photos/sub/d.png", "sku": "D"},
    ])
    out = tmp_path / "shop.fidx"
    rc, _, err = cli(capsys, "index", image_bundle, cat, "--out", out)
    assert rc == 2 and "shop.jsonl:3 (photos/missing.png): no such image file" in err
    rc, stdout, err = cli(capsys, "index", image_bundle, cat, "--out", out, "--skip-bad")
    assert rc == 0, err
    assert "  skipped shop.jsonl:2 (photos/broken.png): not a readable image" in stdout
    assert "  skipped shop.jsonl:3 (photos/missing.png): no such image file" in stdout
    index = Index.load(out)
    assert index.get_metadata(1) == {"image": "photos/a.png", "text": "a dress", "sku": "A"}
    rc, stdout, _ = cli(capsys, "search", out, "--image", photos / "a.png", "--k", 1)
    assert stdout.startswith("  1.  1.0000  id 1  photos/a.png  \"a dress\"  sku=A")
    # the index records its bundle's identity: a query embedded by another bundle is refused
    rc, _, err = cli(capsys, "search", out, "--bundle", text_bundle, "--text", "a dress")
    assert rc == 2 and "indexed with another bundle" in err


def test_help_of_embed_index_search_explains_every_option_with_defaults():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("embed", "index", "search"):
        for action in commands[name]._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"

    def shown(name, option):  # what `fine-infer NAME --help` prints for OPTION, on one line
        block = commands[name].format_help().split("options:", 1)[1].split(f"\n  {option}", 1)[1]
        return " ".join(block.split("\n  -", 1)[0].split())

    for name, option, default in (("search", "--k", "10"), ("search", "--text", "none"), ("search", "--image", "none"),
                                  ("index", "--dtype", "float32"), ("index", "--batch-size", "16"),
                                  ("index", "--task", "auto")):
        assert f"(default: {default}" in shown(name, option), (name, option, shown(name, option))


def _run_on_a_tty(args, block_tqdm=False):
    """Run the CLI with stderr on a pseudo-terminal (100 columns): (exit code, what the terminal received)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    code = ("import sys\n" + ("sys.modules['tqdm'] = None\n" if block_tqdm else "")
            + "from fine_infer.cli import main\nsys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stderr=slave, stdout=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    os.close(slave)
    received = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                received += os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), received.decode(errors="replace")


def test_progress_bar_only_on_a_terminal(bundles, tmp_path, capsys):
    text_bundle, _ = bundles
    cat = tmp_path / "t.txt"
    cat.write_text("\n".join(f"item {i}" for i in range(6)) + "\n")
    rc, received = _run_on_a_tty(["index", text_bundle, cat, "--out", tmp_path / "a.fidx", "--batch-size", 2])
    assert rc == 0 and "0/6" in received and "texts" in received  # tqdm's bar
    rc, received = _run_on_a_tty(["index", text_bundle, cat, "--out", tmp_path / "b.fidx", "--batch-size", 2],
                                 block_tqdm=True)
    assert rc == 0 and "\rembedding 2/6 texts (33%)" in received and "\rembedding 6/6 texts (100%)" in received
    rc, received = _run_on_a_tty(["index", text_bundle, cat, "--out", tmp_path / "c.fidx", "--quiet"])
    assert rc == 0 and received == ""
    rc, _, err = cli(capsys, "index", text_bundle, cat, "--out", tmp_path / "d.fidx")  # stderr not a terminal
    assert rc == 0 and err == ""


def test_out_paths_that_are_not_files_are_refused_and_links_are_followed(bundles, tmp_path, capsys):
    text_bundle, _ = bundles
    cat = tmp_path / "t.txt"
    cat.write_text("a red dress\nwhite sneakers\n")
    fifo = tmp_path / "pipe.fidx"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.fidx"
    folder.mkdir()
    for target, needle in ((fifo, "exists and is not a regular file"), (folder, "exists and is not a regular file"),
                           (cat / "x.fidx", "is not a folder")):
        rc, _, err = cli(capsys, "index", text_bundle, cat, "--out", target, "--force")
        assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert fifo.is_fifo() and folder.is_dir() and cat.read_text() == "a red dress\nwhite sneakers\n"
    rc, _, err = cli(capsys, "index", text_bundle, cat, "--out", cat, "--force")  # the catalogue itself
    assert rc == 2 and "is the catalogue being indexed" in err and cat.read_text().startswith("a red dress")

    store = tmp_path / "store"
    rc, _, err = cli(capsys, "index", text_bundle, cat, "--out", store / "real.fidx")
    assert rc == 0, err
    link = tmp_path / "current.fidx"
    link.symlink_to(store / "real.fidx")
    more = tmp_path / "more.txt"
    more.write_text("navy wool coat\n")
    rc, _, err = cli(capsys, "index", text_bundle, more, "--out", link, "--add")
    assert rc == 0, err
    assert link.is_symlink() and len(Index.load(store / "real.fidx")) == 3  # the target grew; the link stays
    rc, _, err = cli(capsys, "index", text_bundle, more, "--out", link, "--add", "--dtype", "int8")
    assert rc == 2 and "--dtype int8 does not match" in err and len(Index.load(link)) == 3


def test_catalogues_that_are_not_regular_files_are_refused(bundles, tmp_path, capsys):
    text_bundle, _ = bundles
    fifo = tmp_path / "cat.txt"
    os.mkfifo(fifo)  # reading it would block forever
    zero = tmp_path / "zero.txt"
    zero.symlink_to("/dev/zero")  # reading it would never end
    for source in (fifo, zero):
        rc, _, err = cli(capsys, "index", text_bundle, source, "--out", tmp_path / "x.fidx")
        assert rc == 2 and "is not a regular file" in err, err


def test_implicit_ids_past_int64_fail_before_embedding(bundles, tmp_path, capsys):
    text_bundle, _ = bundles
    out = tmp_path / "x.fidx"
    write_jsonl(tmp_path / "top.jsonl", [{"id": (1 << 63) - 1, "text": "a red dress"}])
    assert cli(capsys, "index", text_bundle, tmp_path / "top.jsonl", "--out", out)[0] == 0
    before = out.read_bytes()
    (tmp_path / "more.txt").write_text("white sneakers\n")
    rc, _, err = cli(capsys, "index", text_bundle, tmp_path / "more.txt", "--out", out, "--add")
    assert rc == 2 and "would run past int64" in err and 'its own "id"' in err
    assert out.read_bytes() == before


def test_search_escapes_what_a_terminal_would_act_on(bundles, tmp_path, capsys):
    text_bundle, _ = bundles
    rows = [{"text": "a red dress", 'sku\n  2.  0.9999  id 777  "FORGED"\nx': "A1"},
            {"text": "blue jeans", "note": "ok\u001b[2J\u001b[31mRED", "u": "a\rFAKE", "b": "x\u202eevil"}]
    write_jsonl(tmp_path / "inj.jsonl", rows)
    out = tmp_path / "inj.fidx"
    assert cli(capsys, "index", text_bundle, tmp_path / "inj.jsonl", "--out", out)[0] == 0
    rc, stdout, err = cli(capsys, "search", out, "--text", "a red dress", "--k", 2)
    assert rc == 0, err
    lines = stdout.splitlines()
    assert len(lines) == 2 and all(line.isprintable() for line in lines), lines
    assert '"sku\\n  2.  0.9999  id 777  \\"FORGED\\"\\…=A1' in stdout  # escaped, then cut at 40
    assert 'note="ok\\u001b[2J\\u001b[31mRED"' in stdout and 'u="a\\rFAKE"' in stdout and 'b="x\\u202eevil"' in stdout
    rc, stdout, _ = cli(capsys, "search", out, "--text", "a red dress", "--k", 2, "--json")
    assert json.loads(stdout)["hits"][1]["note"] == rows[1]["note"]  # --json keeps the value, escaped by JSON


def test_hand_made_index_files_are_refused_in_one_line(bundles, tmp_path, capsys):
    text_bundle, _ = bundles
    session = fine_infer.load(text_bundle)
    vectors = session.embed_texts(["a red dress", "white sneakers"])

    def index_with(**change):
        index = Index(vectors.shape[1])
        index.add(vectors, [3, 4], metadata=[{"text": "a red dress"}, {"text": "white sneakers"}])
        index.attrs.update(bundle=str(text_bundle.resolve()), bundle_identity=session.manifest.identity())
        index.attrs.update(change.get("attrs", {}))
        if "meta" in change:
            index._meta[3] = change["meta"]  # what a hostile writer can put there (checksums are its own)
        if "first_id" in change:
            index._ids[0] = change["first_id"]
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.fidx"
        index.save(path)
        return path

    for change, needle in (({"meta": 5}, "the metadata of id 3 is not an object"),
                           ({"meta": {"n": json.loads("[" * 34 + "1" + "]" * 34)}},
                            "nested deeper than"),
                           ({"first_id": -1}, "id -1 in section 'ids'"),
                           ({"attrs": {"bundle": 12345}}, "attrs.bundle is not a string"),
                           ({"attrs": {"bundle_identity": 12345}}, "attrs.bundle_identity is not a string")):
        rc, _, err = cli(capsys, "search", index_with(**change), "--text", "dress")
        assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, (change, err)
    with pytest.raises(fine_infer.InputError, match="nested deeper than 32"):
        Index(vectors.shape[1]).add(vectors[:1], [1], metadata=[{"n": json.loads("[" * 40 + "]" * 40)}])


def test_embed_out_and_truncate(bundles, tmp_path, capsys):
    text_bundle, _ = bundles
    session = fine_infer.load(text_bundle)
    out = tmp_path / "q.npy"
    rc, stdout, err = cli(capsys, "embed", text_bundle, "--text", "a red dress", "--out", out)
    assert rc == 0 and stdout.strip().endswith(str(out)), err
    np.testing.assert_allclose(np.load(out), session.embed_texts(["a red dress"]), atol=ATOL, rtol=0)
    before = out.read_bytes()
    for args, needle in ((["--out", out], "already exists; pass --force"),
                         (["--out", tmp_path / "q"], "must end in .npy"),
                         (["--out", tmp_path / "f.txt" / "q.npy", "--force"], None)):
        (tmp_path / "f.txt").write_text("x")
        rc, _, err = cli(capsys, "embed", text_bundle, "--text", "a blue coat", *args)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and (needle is None or needle in err), err
    assert out.read_bytes() == before and not (tmp_path / "q.npy.npy").exists()

    # over the tiny tower's 32 tokens: refused with the CLI's option as the fix, or cut with --truncate
    rc, _, err = cli(capsys, "embed", text_bundle, "--text", LONG)
    assert rc == 2 and "pass --truncate" in err and "truncate=True" not in err
    rc, stdout, err = cli(capsys, "embed", text_bundle, "--text", LONG, "--truncate")
    assert rc == 0, err
    got = np.array(json.loads(stdout)["embeddings"])
    np.testing.assert_allclose(got, session.embed_texts([LONG], truncate=True), atol=1e-6, rtol=0)
    write_jsonl(tmp_path / "long.jsonl", [{"id": 1, "text": LONG}, {"id": 2, "text": "a red dress"}])
    rc, _, err = cli(capsys, "index", text_bundle, tmp_path / "long.jsonl", "--out", tmp_path / "l.fidx",
                     "--truncate")
    assert rc == 0, err
    np.testing.assert_allclose(Index.load(tmp_path / "l.fidx").get_vectors([1]),
                               session.embed_texts([LONG], truncate=True), atol=ATOL, rtol=0)
    rc, stdout, err = cli(capsys, "search", tmp_path / "l.fidx", "--text", LONG, "--truncate", "--k", 1)
    assert rc == 0 and stdout.startswith("  1.  1.0000  id 1"), (stdout, err)
