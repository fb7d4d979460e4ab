"""End-to-end tests for download.sh against local fakes of Meta's servers.

Each fake bucket holds exactly one family's layout on Meta's server (so a wrong
path is a 404 and fails the test): Llama 2 as Meta's llama download.sh fetches
it, Llama 3 as Meta's llama3 download.sh does, Llama 3.1/3.2/3.3 as llama-models'
downloader does (folders and files taken from llama_models.sku_list itself).
It is served by http.server on 127.0.0.1; the script is run with bash in a
subprocess, exactly as a user would run it.
"""

import functools
import hashlib
import os
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "download.sh"

# Independent copy of the expected layout: bucket folder -> number of shards.
LLAMA2 = {
    "7B": ("llama-2-7b", 1),
    "13B": ("llama-2-13b", 2),
    "70B": ("llama-2-70b", 8),
    "7B-chat": ("llama-2-7b-chat", 1),
    "13B-chat": ("llama-2-13b-chat", 2),
    "70B-chat": ("llama-2-70b-chat", 8),
}
TOP_FILES = ["LICENSE", "USE_POLICY.md"]
LLAMA2_TOP = TOP_FILES + ["tokenizer.model", "tokenizer_checklist.chk"]
# Meta's llama3 download.sh: name -> (bucket folder, local folder, shards); LICENSE and USE_POLICY on top.
LLAMA3 = {
    "8B": ("8b_pre_trained", "Meta-Llama-3-8B", 1),
    "8B-instruct": ("8b_instruction_tuned", "Meta-Llama-3-8B-Instruct", 1),
    "70B": ("70b_pre_trained", "Meta-Llama-3-70B", 8),
    "70B-instruct": ("70b_instruction_tuned", "Meta-Llama-3-70B-Instruct", 8),
}
LLAMA3_TOP = ["LICENSE", "USE_POLICY"]
SIGNATURE = "Policy=eyJTdGF0ZW1lbnQi%3D&Signature=abc~def&Key-Pair-Id=K2TEST"

TIMEOUT = 60


def _md5(data):
    return hashlib.md5(data).hexdigest()


class BucketHandler(SimpleHTTPRequestHandler):
    """Static files; ignores the signed query string; honours Range."""

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        self.path = self.path.split("?", 1)[0]
        local = self.translate_path(self.path)
        rng = self.headers.get("Range", "")
        if not rng.startswith("bytes=") or not os.path.isfile(local):
            return super().do_GET()
        data = Path(local).read_bytes()
        first, _, last = rng[len("bytes="):].partition("-")
        start = int(first)
        end = min(int(last), len(data) - 1) if last else len(data) - 1
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(data[start : end + 1])

    def log_message(self, *args):
        pass


def _write_model(root, folder, files, size=40_000):
    """Writes folder/<file> for every file name (random bytes; params.json a small JSON) and a
    checklist.chk holding their md5 sums."""
    d = root / folder
    d.mkdir(parents=True)
    written = {}
    for i, name in enumerate(f for f in files if f != "checklist.chk"):
        data = b'{"dim": 64, "n_layers": 2, "n_heads": 4}\n' if name == "params.json" else os.urandom(size + 100 * i)
        (d / name).write_bytes(data)
        written[name] = data
    (d / "checklist.chk").write_text("".join(f"{_md5(data)}  {name}\n" for name, data in written.items()))


def _shards(n):
    return [f"consolidated.{i:02d}.pth" for i in range(n)]


def _top(root, names):
    for name in names:
        (root / name).write_text(f"{name} (test copy)\n")


@pytest.fixture
def serve():
    """serve(root): an HTTP server for the folder `root`, stopped after the test."""
    servers = []

    def start(root):
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(BucketHandler, directory=str(root)))
        server.daemon_threads = True
        server.requests = []
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        server.root = root
        server.url = f"http://127.0.0.1:{server.server_address[1]}/*?{SIGNATURE}"
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def bucket(tmp_path, serve):
    """Meta's Llama 2 server: LICENSE, USE_POLICY.md and the shared tokenizer on top, one
    lower-case folder per model."""
    root = tmp_path / "bucket"
    root.mkdir()
    _top(root, TOP_FILES)
    tok = os.urandom(5_000)
    (root / "tokenizer.model").write_bytes(tok)
    (root / "tokenizer_checklist.chk").write_text(f"{_md5(tok)}  tokenizer.model\n")
    for folder, shards in LLAMA2.values():
        _write_model(root, folder, _shards(shards) + ["params.json", "checklist.chk"])
    return serve(root)


@pytest.fixture
def llama3_bucket(tmp_path, serve):
    """Meta's Llama 3 server, as its llama3 download.sh reads it."""
    root = tmp_path / "bucket3"
    root.mkdir()
    _top(root, LLAMA3_TOP)
    for folder, _, shards in LLAMA3.values():
        _write_model(root, folder, _shards(shards) + ["params.json", "tokenizer.model", "checklist.chk"])
    return serve(root)


def llama3x_models():
    """llama-models' text models of Llama 3.1, 3.2 and 3.3: model id -> (bucket folder, files),
    straight from its downloader's table."""
    from llama_models.sku_list import all_registered_models, llama_meta_net_info

    models = {}
    for model in all_registered_models():
        name = model.descriptor()
        if name.startswith(("Llama3.1-", "Llama3.2-", "Llama3.3-")) and "Vision" not in name:
            info = llama_meta_net_info(model)
            models[name] = (info.folder, info.files)
    return models


@pytest.fixture
def llama3x_bucket(tmp_path, serve):
    """The server llama-models downloads Llama 3.1/3.2/3.3 from: the signed URL's '*' becomes
    <folder>/<file>; nothing else is on it."""
    root = tmp_path / "bucket3x"
    root.mkdir()
    for folder, files in llama3x_models().values():
        _write_model(root, folder, files, size=2_000)
    return serve(root)


def run_script(tmp_path, *args, env=None, stdin_text=None):
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER", "LLAMA_FAMILY", "LLAMA_DOWNLOADER")
        and "proxy" not in k.lower()
    }
    home = tmp_path / "home"  # keep ~/.wgetrc / ~/.curlrc out of the picture
    home.mkdir(exist_ok=True)
    base.update(HOME=str(home), no_proxy="*")
    base.update(env or {})
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=base,
        cwd=tmp_path,
        input=stdin_text,
        stdin=subprocess.DEVNULL if stdin_text is None else None,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    proc.output = proc.stdout + proc.stderr
    return proc


def env_for(bucket, target, models, **extra):
    return {"PRESIGNED_URL": bucket.url, "MODEL_SIZE": models, "TARGET_FOLDER": str(target), **extra}


def assert_same_files(bucket_root, target, relpaths):
    for rel in relpaths:
        got = target / rel
        assert got.is_file(), f"{rel} was not downloaded"
        assert got.read_bytes() == (bucket_root / rel).read_bytes(), f"{rel} differs"


def model_files(root, folder):
    return [f"{folder}/{p.name}" for p in sorted((root / folder).iterdir())]


def paths_requested(bucket):
    return [p.split("?", 1)[0] for p, _ in bucket.requests]


@pytest.mark.parametrize("downloader", ["wget", "curl"])
def test_llama2_full_download(bucket, tmp_path, downloader):
    if shutil.which(downloader) is None:
        pytest.skip(f"{downloader} not installed")
    target = tmp_path / "out"
    r = run_script(tmp_path, env=env_for(bucket, target, "7b, 13B", LLAMA_DOWNLOADER=downloader))
    assert r.returncode == 0, r.output

    expected = LLAMA2_TOP + model_files(bucket.root, "llama-2-7b") + model_files(bucket.root, "llama-2-13b")
    assert "llama-2-13b/consolidated.01.pth" in expected
    assert_same_files(bucket.root, target, expected)
    on_disk = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert on_disk == sorted(expected)

    for line in [
        "Downloading LICENSE and Acceptable Usage Policy",
        "Downloading tokenizer",
        "Downloading shard 1 of 1 for 7B",
        "Downloading shard 1 of 2 for 13B",
        "Downloading shard 2 of 2 for 13B",
        "Checking checksums",
        "llama-2-13b/consolidated.01.pth: OK",
    ]:
        assert line in r.output
    # every request carried the signature from the email URL
    assert bucket.requests and all(p.endswith("?" + SIGNATURE) for p, _ in bucket.requests)

    # running again is harmless: complete files are kept, everything re-verified
    r2 = run_script(tmp_path, env=env_for(bucket, target, "7B,13B", LLAMA_DOWNLOADER=downloader))
    assert r2.returncode == 0, r2.output
    assert_same_files(bucket.root, target, expected)


def served_files(bucket):
    return sorted(str(p.relative_to(bucket.root)) for p in bucket.root.rglob("*") if p.is_file())


def test_llama3_enter_means_all_four_in_metas_folders(llama3_bucket, tmp_path):
    target = tmp_path / "out"
    r = run_script(tmp_path, "--family", "llama3", env=env_for(llama3_bucket, target, ""))
    assert r.returncode == 0, r.output
    # Every file of the server fetched once, nothing else asked for (USE_POLICY has no .md here).
    assert sorted(p.lstrip("/") for p in paths_requested(llama3_bucket)) == served_files(llama3_bucket)
    for folder, local, shards in LLAMA3.values():
        for name in _shards(shards) + ["params.json", "tokenizer.model", "checklist.chk"]:
            assert (target / local / name).read_bytes() == (llama3_bucket.root / folder / name).read_bytes()
        assert not (target / folder).exists()
    assert_same_files(llama3_bucket.root, target, LLAMA3_TOP)
    assert "Downloading shard 8 of 8 for 70B-instruct" in r.output
    assert "Meta-Llama-3-70B-Instruct/consolidated.07.pth: OK" in r.output


def test_llama3_names_in_any_case_and_our_folder_names(llama3_bucket, tmp_path):
    """Meta's script takes 8b / 8B-Instruct / 8b-instruct ...; the local folder names are our
    older names for the same models. 70B alone would be Llama 2's: 8b tells the family."""
    target = tmp_path / "out"
    r = run_script(tmp_path, env=env_for(llama3_bucket, target, "8b,70b-Instruct,Meta-Llama-3-8B"))
    assert r.returncode == 0, r.output
    assert (target / "Meta-Llama-3-8B" / "tokenizer.model").is_file()
    assert (target / "Meta-Llama-3-70B-Instruct" / "consolidated.07.pth").is_file()
    assert not (target / "Meta-Llama-3-8B-Instruct").exists()
    assert paths_requested(llama3_bucket).count("/8b_pre_trained/consolidated.00.pth") == 1


def test_llama3_interactive_prompt_lists_metas_names(llama3_bucket, tmp_path):
    r = run_script(tmp_path, "--family=llama3", stdin_text=f"{llama3_bucket.url}\n8B-instruct\n")
    assert r.returncode == 0, r.output
    assert "(8B,8B-instruct,70B,70B-instruct), or press Enter for all" in r.output
    assert (tmp_path / "Meta-Llama-3-8B-Instruct" / "consolidated.00.pth").is_file()


def test_llama3x_every_model_where_llama_models_finds_it(llama3x_bucket, tmp_path):
    models = llama3x_models()
    assert len(models) == 19 and "Llama3.3-70B-Instruct" in models
    target = tmp_path / "out"
    r = run_script(tmp_path, env=env_for(llama3x_bucket, target, ",".join(models)))
    assert r.returncode == 0, r.output
    # Exactly llama-models' URLs: '*' -> <folder>/<file> for each file it lists; no LICENSE.
    expected = sorted(f"{folder}/{name}" for folder, files in models.values() for name in files)
    assert sorted(p.lstrip("/") for p in paths_requested(llama3x_bucket)) == expected
    for name, (folder, files) in models.items():
        local = target / name.replace(":", "-")  # llama-models' local folder for a model id
        for file in files:
            assert (local / file).read_bytes() == (llama3x_bucket.root / folder / file).read_bytes(), (name, file)
    assert "Llama3.1-405B-bf16-mp16/consolidated.15.pth: OK" in r.output


def test_llama3x_names_in_any_case_with_the_family_flag(llama3x_bucket, tmp_path):
    target = tmp_path / "out"
    r = run_script(tmp_path, "--family", "llama3.2", env=env_for(llama3x_bucket, target, "llama3.2-1b-instruct"))
    assert r.returncode == 0, r.output
    assert sorted(paths_requested(llama3x_bucket)) == sorted(
        f"/Llama-3.2-1B-Instruct/{f}" for f in ["checklist.chk", "tokenizer.model", "params.json",
                                                 "consolidated.00.pth"])
    assert "Llama3.2-1B-Instruct/tokenizer.model: OK" in r.output


def test_llama3x_enter_asks_for_names(llama3x_bucket, tmp_path):
    r = run_script(tmp_path, "--family", "llama3.1", env=env_for(llama3x_bucket, tmp_path / "out", ""))
    assert r.returncode != 0
    assert "no 'all': name the models" in r.output and "Llama3.1-405B:bf16-mp16" in r.output
    assert llama3x_bucket.requests == []


def test_family_flag_enter_means_all(bucket, tmp_path):
    # With the family known, an empty model list means every model of it.
    # Only one Llama 3.x model exists in the fake bucket, so use Llama 2.
    target = tmp_path / "out"
    r = run_script(tmp_path, "--family", "llama2", env=env_for(bucket, target, ""))
    assert r.returncode == 0, r.output
    for folder, _ in LLAMA2.values():
        assert_same_files(bucket.root, target, model_files(bucket.root, folder))
    assert "Downloading shard 8 of 8 for 70B-chat" in r.output


def test_interactive_prompts(bucket, tmp_path):
    # No env vars: URL and model list come from stdin; files land in cwd.
    r = run_script(tmp_path, stdin_text=f"{bucket.url}\n7B\n")
    assert r.returncode == 0, r.output
    assert "Enter the URL from email: " in r.output
    assert "Enter the list of models to download" in r.output
    assert_same_files(bucket.root, tmp_path, LLAMA2_TOP + model_files(bucket.root, "llama-2-7b"))
    assert not (tmp_path / "llama-2-13b").exists()


def test_interactive_enter_for_all(bucket, tmp_path):
    # URL pasted with surrounding spaces; input ends at the model prompt (= Enter).
    r = run_script(tmp_path, stdin_text=f"  {bucket.url}  \n", env={"TARGET_FOLDER": str(tmp_path / "out")})
    assert r.returncode == 0, r.output
    for folder, _ in LLAMA2.values():
        assert (tmp_path / "out" / folder / "consolidated.00.pth").is_file()


def test_no_input_fails_without_hanging(tmp_path):
    r = run_script(tmp_path)  # stdin is /dev/null
    assert r.returncode != 0
    assert "no URL given" in r.output


def test_url_without_star_is_rejected(bucket, tmp_path):
    env = env_for(bucket, tmp_path / "out", "7B")
    env["PRESIGNED_URL"] = bucket.url.replace("*", "llama-2-7b")
    r = run_script(tmp_path, env=env)
    assert r.returncode != 0
    assert "'*'" in r.output
    assert bucket.requests == []


@pytest.mark.parametrize("rel", ["llama-2-7b/consolidated.00.pth", "tokenizer.model"])
def test_corrupted_file_fails_checksum(bucket, tmp_path, rel):
    f = bucket.root / rel
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF  # same size, different bytes than the checklist says
    f.write_bytes(bytes(data))
    r = run_script(tmp_path, env=env_for(bucket, tmp_path / "out", "7B"))
    assert r.returncode != 0
    assert f"{rel}: FAILED" in r.output
    assert "checksum mismatch" in r.output
    assert "delete" in r.output


def test_wrong_size_file_fails_checksum_llama3x(llama3x_bucket, tmp_path):
    f = llama3x_bucket.root / "Llama-3.2-1B-Instruct" / "tokenizer.model"
    f.write_bytes(f.read_bytes()[:-10])
    r = run_script(tmp_path, env=env_for(llama3x_bucket, tmp_path / "out", "Llama3.2-1B-Instruct"))
    assert r.returncode != 0
    assert "Llama3.2-1B-Instruct/tokenizer.model: FAILED" in r.output


@pytest.mark.parametrize("downloader", ["wget", "curl"])
def test_resume_partial_shard(bucket, tmp_path, downloader):
    if shutil.which(downloader) is None:
        pytest.skip(f"{downloader} not installed")
    rel = "llama-2-13b/consolidated.01.pth"
    full = (bucket.root / rel).read_bytes()
    half = len(full) // 2
    target = tmp_path / "out"
    (target / "llama-2-13b").mkdir(parents=True)
    (target / rel).write_bytes(full[:half])

    r = run_script(tmp_path, env=env_for(bucket, target, "13B", LLAMA_DOWNLOADER=downloader))
    assert r.returncode == 0, r.output
    assert (target / rel).read_bytes() == full
    ranges = [rng for p, rng in bucket.requests if p.split("?", 1)[0] == "/" + rel]
    assert ranges == [f"bytes={half}-"]


def test_resume_into_a_local_folder_named_otherwise(llama3_bucket, tmp_path):
    """Llama 3: the bucket folder (8b_instruction_tuned) is not the local one."""
    full = (llama3_bucket.root / "8b_instruction_tuned" / "consolidated.00.pth").read_bytes()
    target = tmp_path / "out"
    (target / "Meta-Llama-3-8B-Instruct").mkdir(parents=True)
    (target / "Meta-Llama-3-8B-Instruct" / "consolidated.00.pth").write_bytes(full[:1000])
    r = run_script(tmp_path, env=env_for(llama3_bucket, target, "8B-instruct"))
    assert r.returncode == 0, r.output
    assert (target / "Meta-Llama-3-8B-Instruct" / "consolidated.00.pth").read_bytes() == full
    ranges = [rng for p, rng in llama3_bucket.requests if p.startswith("/8b_instruction_tuned/consolidated.00.pth")]
    assert ranges == ["bytes=1000-"]


@pytest.mark.parametrize(
    "models, bad",
    [("7B,42B", "42B"), ("Llama3.2-2B", "Llama3.2-2B"), ("llama-2-7b", "llama-2-7b")],
)
def test_unknown_model_name(bucket, tmp_path, models, bad):
    target = tmp_path / "out"
    r = run_script(tmp_path, env=env_for(bucket, target, models))
    assert r.returncode != 0
    assert f"unknown model name(s): {bad}" in r.output
    assert "13B-chat" in r.output and "Llama3.2-1B-Instruct" in r.output  # valid names listed
    assert bucket.requests == []
    assert not target.exists()


@pytest.mark.parametrize("models", ["7B,Llama3.2-1B-Instruct", "8B,Llama3.1-8B", "Llama3.1-8B,70B-chat"])
def test_mixed_families_rejected(bucket, tmp_path, models):
    target = tmp_path / "out"
    r = run_script(tmp_path, env=env_for(bucket, target, models))
    assert r.returncode != 0
    assert models.split(",")[1] in r.output and "separately" in r.output
    assert bucket.requests == []


def test_family_hint_mismatch_rejected(bucket, tmp_path):
    r = run_script(tmp_path, env=env_for(bucket, tmp_path / "out", "7B", LLAMA_FAMILY="llama3"))
    assert r.returncode != 0
    assert "'7B' is a Llama 2 model but the download is for Llama 3 models" in r.output
    assert bucket.requests == []


def test_bad_family_value(bucket, tmp_path):
    r = run_script(tmp_path, "--family=llama9", env=env_for(bucket, tmp_path / "out", "7B"))
    assert r.returncode != 0
    assert "unknown model family 'llama9'" in r.output


@pytest.mark.parametrize("rel", ["llama-2-7b/params.json", "llama-2-7b/consolidated.00.pth", "USE_POLICY.md"])
def test_missing_file_404(bucket, tmp_path, rel):
    (bucket.root / rel).unlink()
    target = tmp_path / "out"
    r = run_script(tmp_path, env=env_for(bucket, target, "7B"))
    assert r.returncode != 0
    assert f"failed to download '{rel}'" in r.output
    assert not (target / rel).exists()  # no empty placeholder left behind
