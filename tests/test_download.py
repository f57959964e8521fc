"""--download: the course folder rebuilt from GEO-format count CSVs, offline.

Nothing here touches the network: the sources are folders of small fixture files, a
file:// URL, and an HTTP server on 127.0.0.1 in a thread.
"""

import contextlib
import functools
import gzip
import http.server
import pickle
import socket
import threading

import numpy as np
import pandas as pd
import pytest

from cellembed.data import COURSE_FILES, load_course_data
from cellembed.data.download import GEO_URL, SAMPLES, DownloadError, build_course_folder
from course_fixtures import GEO_NAMES, geo_frame, write_course_folder, write_geo_file, write_geo_folder

N_GENES = 20  # of the fixtures' 40


@pytest.fixture
def geo_dir(tmp_path):
    return write_geo_folder(tmp_path / "geo")


@contextlib.contextmanager
def http_server(folder):
    """Serve ``folder`` on 127.0.0.1 (a free port) for the duration of the block."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def assert_nothing_left(tmp_path, dest):
    assert not dest.exists(), "a partial data folder was left"
    assert not list(tmp_path.glob(".*.tmp")), "a staging folder was left"


def test_builds_the_course_layout_from_a_folder(tmp_path, geo_dir, capsys):
    dest = build_course_folder(tmp_path / "data", source=str(geo_dir), n_genes=N_GENES)
    out = capsys.readouterr().out
    assert "approximates the course's MP_genes.pickle" in out and "highly_variable_genes(flavor='seurat'" in out
    assert sorted(p.name for p in dest.iterdir()) == sorted(COURSE_FILES)
    assert not list(tmp_path.glob(".*.tmp"))

    df = pickle.loads((dest / "MP.pickle").read_bytes())
    genes = pickle.loads((dest / "MP_genes.pickle").read_bytes())
    ids = pickle.loads((dest / "cell_IDs.pkl").read_bytes())
    info = pd.read_csv(dest / "sample_info.csv")
    assert isinstance(genes, pd.Index) and len(genes) == N_GENES and type(ids) is tuple
    assert list(df.columns) == ["Unnamed: 0", *genes, "batch", "assigned_cluster"]
    assert list(info.columns) == ["Unnamed: 0", "batch", "assigned_cluster"]
    mouse1, mouse2 = geo_frame(1), geo_frame(2)
    assert list(ids) == [*mouse1.index, *mouse2.index]  # GEO order
    np.testing.assert_array_equal(df[list(genes)].to_numpy(), pd.concat([mouse1, mouse2])[list(genes)].to_numpy())
    assert list(df["batch"]) == [0] * 30 + [1] * 30
    assert list(df["assigned_cluster"]) == [*mouse1["assigned_cluster"], *mouse2["assigned_cluster"]]

    adata = load_course_data(dest)  # the loader (allow-list unpickler included) accepts it
    assert adata.shape == (60, N_GENES)


def test_uncompressed_csvs_and_an_existing_folder_are_fine(tmp_path):
    src = tmp_path / "geo"
    src.mkdir()
    for mouse, name in GEO_NAMES.items():
        write_geo_file(src / name.removesuffix(".gz"), geo_frame(mouse))
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "README.md").write_text("kept")
    build_course_folder(dest, source=str(src), n_genes=N_GENES)
    assert (dest / "README.md").read_text() == "kept"
    assert load_course_data(dest).shape == (60, N_GENES)


def test_fetches_over_http_and_file_urls(tmp_path, geo_dir):
    with http_server(geo_dir) as url:
        build_course_folder(tmp_path / "via_http", source=url + "/", n_genes=N_GENES)
    build_course_folder(tmp_path / "via_file", source=geo_dir.as_uri(), n_genes=N_GENES)
    for name in COURSE_FILES[1:]:
        assert (tmp_path / "via_http" / name).read_bytes() == (tmp_path / "via_file" / name).read_bytes()


def test_geo_urls_are_the_download_service():
    assert [GEO_URL.format(acc=acc, file=name) for acc, name, _ in SAMPLES] == [
        "https://www.ncbi.nlm.nih.gov/geo/download/?acc=GSM2230761&format=file"
        "&file=GSM2230761_mouse1_umifm_counts.csv.gz",
        "https://www.ncbi.nlm.nih.gov/geo/download/?acc=GSM2230762&format=file"
        "&file=GSM2230762_mouse2_umifm_counts.csv.gz",
    ]


def test_http_404_names_the_url(tmp_path):
    (tmp_path / "empty").mkdir()
    with http_server(tmp_path / "empty") as url:
        with pytest.raises(DownloadError, match=rf"^{url}/GSM2230761_mouse1_umifm_counts\.csv\.gz: HTTP 404 "
                                                r".*download GSM2230761.* --download FOLDER"):
            build_course_folder(tmp_path / "data", source=url, n_genes=N_GENES)
    assert_nothing_left(tmp_path, tmp_path / "data")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_is_a_network_error(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(DownloadError, match=rf"^{url}/GSM2230761\S+: cannot connect \(.*refused\); check the "
                                            "network connection"):
        build_course_folder(tmp_path / "data", source=url, n_genes=N_GENES)
    assert_nothing_left(tmp_path, tmp_path / "data")


def test_silent_server_times_out(tmp_path):
    with socket.socket() as sock:  # accepts the connection (backlog) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(DownloadError, match=r"no answer within 0\.3 s; check the network connection"):
            build_course_folder(tmp_path / "data", source=url, n_genes=N_GENES, timeout=0.3)
    assert_nothing_left(tmp_path, tmp_path / "data")


def _gz(frame):
    return gzip.compress(frame.to_csv().encode())


def _edit(fn):
    frame = geo_frame(1)
    fn(frame)
    return _gz(frame)


def _set(frame, row, gene, value):
    frame[gene] = frame[gene].astype(object)  # takes a float, a string or a NaN
    frame.iloc[row, frame.columns.get_loc(gene)] = value


BAD_FILES = [
    ("error-page", b"<!DOCTYPE html><html><body>Service unavailable, try later</body></html>" * 4,
     r"not gzip data \(it starts with b'<!DOCTYPE html>"),
    ("tiny", gzip.compress(b",barcode"), r"only \d+ bytes, not a GEO count file"),
    ("truncated-gzip", _gz(geo_frame(1))[:600], r"unreadable \((EOFError|BadGzipFile)"),
    ("wrong-header", gzip.compress(geo_frame(1).drop(columns="barcode").to_csv().encode()),
     r"header starts '', 'assigned_cluster', 'Gene000', 'Gene001', expected a cell id column, 'barcode'"),
    ("duplicate-gene", gzip.compress(geo_frame(1).to_csv().replace("Gene005", "Gene004", 1).encode()),
     r"duplicate or empty gene names in the header \('Gene004'\)"),
    ("cut-row", gzip.compress(geo_frame(1).to_csv().rsplit(",", 5)[0].encode()),
     r"5 missing \(the file is cut short\?\) count\(s\), e.g. line 31"),
    ("negative", _edit(lambda f: _set(f, 2, "Gene003", -1)), r"1 negative count\(s\), e.g. line 4, gene 'Gene003'"),
    ("fraction", _edit(lambda f: _set(f, 2, "Gene003", 0.25)), r"1 non-integer count\(s\)"),
    ("text", _edit(lambda f: _set(f, 2, "Gene003", "many")), r"gene column\(s\) 'Gene003' hold text"),
    ("no-label", _edit(lambda f: _set(f, 4, "assigned_cluster", np.nan)), r"empty assigned_cluster on line 6"),
    ("duplicate-cell", gzip.compress(geo_frame(1).to_csv().replace("cell_0001", "cell_0000").encode()),
     r"duplicate cell ids \('mouse1_lib1\.final_cell_0000'\)"),
]


@pytest.mark.parametrize("data, pattern", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_refused_naming_it(tmp_path, geo_dir, data, pattern):
    bad = geo_dir / GEO_NAMES[1]
    bad.write_bytes(data)
    dest = tmp_path / "data"
    with pytest.raises(DownloadError, match=rf"^{bad}: {pattern}"):
        build_course_folder(dest, source=str(geo_dir), n_genes=N_GENES)
    assert_nothing_left(tmp_path, dest)


def test_the_two_mice_must_share_their_genes(tmp_path, geo_dir):
    write_geo_file(geo_dir / GEO_NAMES[2], geo_frame(2).rename(columns={"Gene007": "Gcg"}))
    with pytest.raises(DownloadError, match=r"the two GEO files list different genes \('Gcg', 'Gene007'\)"):
        build_course_folder(tmp_path / "data", source=str(geo_dir), n_genes=N_GENES)
    assert_nothing_left(tmp_path, tmp_path / "data")


def test_too_few_genes_for_the_course_list(tmp_path, geo_dir):
    with pytest.raises(DownloadError, match=r"only 40 genes have any counts, fewer than the 4194 to keep"):
        build_course_folder(tmp_path / "data", source=str(geo_dir))
    assert_nothing_left(tmp_path, tmp_path / "data")


def test_source_that_is_nothing_known(tmp_path):
    with pytest.raises(DownloadError, match=r"--download .*nowhere: not 'geo', an http\(s\):// URL or an existing "
                                            "folder"):
        build_course_folder(tmp_path / "data", source=str(tmp_path / "nowhere"))


def test_folder_missing_a_sample(tmp_path, geo_dir):
    (geo_dir / GEO_NAMES[2]).unlink()
    with pytest.raises(DownloadError, match=r"no GSM2230762_mouse2_umifm_counts\.csv\.gz \(or "
                                            r"GSM2230762_mouse2_umifm_counts\.csv\) in it; download"):
        build_course_folder(tmp_path / "data", source=str(geo_dir), n_genes=N_GENES)


def test_a_complete_course_folder_is_kept(tmp_path, capsys):
    dest = write_course_folder(tmp_path / "data")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    build_course_folder(dest, source=str(tmp_path / "not-needed"))
    assert "already holds the four course files; keeping them" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before


def test_a_partial_course_folder_is_refused(tmp_path, geo_dir):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "MP.pickle").write_bytes(b"old")
    with pytest.raises(DownloadError, match=r"data already holds MP\.pickle but not the other course files; move"):
        build_course_folder(dest, source=str(geo_dir), n_genes=N_GENES)
    assert [p.name for p in dest.iterdir()] == ["MP.pickle"]


def test_data_dir_that_is_a_file(tmp_path, geo_dir):
    (tmp_path / "data").write_text("x")
    with pytest.raises(DownloadError, match=r"--data-dir .*data is a file, not a folder"):
        build_course_folder(tmp_path / "data", source=str(geo_dir), n_genes=N_GENES)
