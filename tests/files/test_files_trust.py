"""A served manifest cannot be turned against the run folder, and a hit never serves bytes it
has not checked (issue 14).

The attacker has write access to the shared table and to the object area, not to the
victim's run folder: the manifests below are written raw into the stored document (the
checksum recomputed as anyone reading our source could), objects raw into the area. The
victim then runs a real flow in a fresh process, in a folder holding its own module, a
``.bashrc``, a symlink to a folder elsewhere...; each attack must meet: the hit is not served
(one warning naming the reason), the job runs and gives plain jobflow's output and files,
and nothing else in the folder changed (a before/after snapshot of names, kinds, modes and
contents, compared with a plain jobflow run in the same starting folder).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xxhash
from jobflow import Flow, job

from jobflow_cache.entry import document_checksum, unpack_document
from jobflow_cache.errors import UnsafeManifestError
from jobflow_cache.files import FileRecord, ObjectArea, check_manifest
from tests.support.jobs import executed

ROOT = Path(__file__).resolve().parents[2]
EVIL = b"import os\nos.system('echo pwned > /tmp/jfc-pwned')\n"
WARNING = "cannot be served"


# --------------------------------------------------------------------------- the victim


@job
def victim_step(x: int) -> int:
    """Write result.txt in the run folder and return a number."""
    executed("victim_step")
    Path("result.txt").write_text(f"result {x}\n" * 30000)  # 300 kB: memoised on disk too
    return x * 2


def _main(engine: str, folder: str) -> None:
    """Run the victim's flow in ``folder`` and print its output (as JSON) last."""
    flow = Flow([victim_step(21)])
    if engine == "plain":
        from jobflow import run_locally
    else:
        from jobflow_cache import run_locally  # type: ignore[assignment]
    responses = run_locally(flow, root_dir=folder, ensure_success=True)
    (response,) = [r[1] for r in responses.values()]
    print(json.dumps(response.output))


def run_victim(
    tmp_path: Path,
    folder: Path,
    engine: str = "cache",
    env: dict[str, str] | None = None,
    base_env: dict[str, str] | None = None,
) -> tuple[Any, dict[str, int], str]:
    """Run the flow in a fresh process: its output, executions per job and stderr."""
    counts = tmp_path / f"counts-{time.monotonic_ns()}"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from tests.files.test_files_trust import _main; _main(*sys.argv[1:])",
            engine,
            str(folder),
        ],
        cwd=ROOT,
        env={
            **(os.environ if base_env is None else base_env),
            "JFC_COUNTS_FILE": str(counts),
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = counts.read_text().split() if counts.exists() else []
    return json.loads(done.stdout.strip().splitlines()[-1]), dict(Counter(lines)), done.stderr


def folder_state(folder: Path) -> dict[str, Any]:
    """Names, kinds, permission bits, contents and link targets below ``folder``."""
    state: dict[str, Any] = {}
    for path in sorted(folder.rglob("*")):
        st = os.lstat(path)
        rel = path.relative_to(folder).as_posix()
        if stat.S_ISLNK(st.st_mode):
            state[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            state[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            state[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return state


def victim_folder(parent: Path, name: str) -> Path:
    """A run folder as the victim keeps it: its own module, a .bashrc, a sub folder and a
    symlink to a folder outside."""
    folder = parent / name
    (folder / "sub").mkdir(parents=True)
    (folder / "victim_jobs.py").write_bytes(b"VICTIM = 1\n")
    (folder / ".bashrc").write_text("export PS1='$ '\n")
    (folder / "sub" / "notes.txt").write_text("mine\n")
    (parent / "outside").mkdir(exist_ok=True)
    (folder / "linked").symlink_to("../outside")
    return folder


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, dict[str, Any]]:
    """One recording of the victim's job (a cache folder to copy per test), and plain
    jobflow's output and folder for it."""
    base = tmp_path_factory.mktemp("recorded")
    cache = base / "cache"
    config = base / "no-config.yaml"
    config.touch()
    env = {"JOBFLOW_CACHE_DIR": str(cache), "JOBFLOW_CACHE_CONFIG_FILE": str(config)}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBFLOW_CACHE_")}
    recorder = base / "recorder"
    recorder.mkdir()
    output, counts, _ = run_victim(base, recorder, env=env, base_env=clean)
    assert counts == {"victim_step": 1}
    plain_folder = victim_folder(base, "plain")
    plain, _, _ = run_victim(base, plain_folder, engine="plain", base_env=clean)
    assert output == plain
    return cache, plain, folder_state(plain_folder)


# --------------------------------------------------------------------------- the attacker


def plant_object(area: Path, content: bytes) -> str:
    """Write an object into the area as an attacker would (raw files)."""
    digest = xxhash.xxh3_128_hexdigest(content)
    path = area / digest[:2] / digest[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(content)
        path.chmod(0o444)
    return digest


def forged(doc: dict[str, Any], files: list[dict[str, Any]]) -> dict[str, Any]:
    """``doc`` with the manifest ``files`` and a checksum that matches again."""
    doc = unpack_document(doc)
    doc["files"] = files
    doc["checksum"] = document_checksum(doc)
    return doc


def _tamper(backend: Any, files: list[dict[str, Any]]) -> int:
    """Replace the manifest of every entry the backend holds, as anyone who may write to the
    store can (documents written as they are: nothing seals them); returns how many."""
    try:
        docs = [doc for doc in backend.select() if "checksum" in doc]
        backend.write([forged(doc, files) for doc in docs])
    finally:
        backend.close()
    return len(docs)


def tamper_sqlite(db: Path, files: list[dict[str, Any]]) -> int:
    """Replace the manifest of every entry in the embedded store; returns how many."""
    from jobflow_cache.backends import SQLiteBackend

    return _tamper(SQLiteBackend(db), files)


def tamper_postgres(uri: str, table: str, files: list[dict[str, Any]]) -> int:
    """The same on a PostgreSQL cache."""
    from jobflow_cache.backends.postgres import PostgresBackend

    return _tamper(PostgresBackend(uri, table=table), files)


def record(path: str, content: bytes = EVIL, **fields: Any) -> dict[str, Any]:
    digest = xxhash.xxh3_128_hexdigest(content)
    return {
        "path": path,
        "size": len(content),
        "xxh3": digest,
        "mode": 0o644,
        "kind": "file",
        "target": "",
        "stored": True,
        "before": None,
        **fields,
    }


def attacks(folder: Path, outside: Path) -> dict[str, list[dict[str, Any]]]:
    """Crafted manifests by name (each also writes the job's own result.txt, evil)."""
    own = record("result.txt")
    victim_module = b"VICTIM = 1\n"  # what victim_folder writes
    return {
        "victim_module": [own, record("victim_jobs.py")],
        "victim_module_replaced": [
            own,
            record(
                "victim_jobs.py",
                before={
                    "kind": "file",
                    "size": len(victim_module),
                    "xxh3": xxhash.xxh3_128_hexdigest(victim_module),
                    "target": "",
                },
            ),
        ],
        "parent": [own, record("../escaped.txt")],
        "absolute": [own, record(str(outside / "absolute.txt"))],
        "inside_outside": [own, record("linked/../../escaped.txt")],
        "dot_dot_inside": [own, record("sub/../../escaped.txt")],
        "dot_slash": [own, record("./result.txt")],
        "bashrc": [own, record(".bashrc")],
        "newline": [own, record("a\nb.txt")],
        "nul": [own, record("a\x00b.txt")],
        "pycache": [own, record("__pycache__/victim_jobs.cpython-311.pyc")],
        "pth": [own, record("evil.pth")],
        "sitecustomize": [own, record("sitecustomize.py")],
        "usercustomize": [own, record("usercustomize.py")],
        "extension": [own, record("victim_jobs.cpython-311-x86_64-linux-gnu.so")],
        "git_hook": [own, record(".git/hooks/post-checkout")],
        "symlink_out": [
            own,
            {**record("victim_pkg"), "kind": "symlink", "target": str(outside), "size": 0},
        ],
        "symlink_up": [
            own,
            {**record("sub/up"), "kind": "symlink", "target": "../../x", "size": 0},
        ],
        "through_symlinked_dir": [own, record("linked/planted.txt")],
        "through_manifest_symlink": [
            {**record("d"), "kind": "symlink", "target": "sub", "size": 0},
            record("d/planted.txt"),
            own,
        ],
        "setuid": [{**record("result.txt"), "mode": 0o4755}],
        "twice": [own, own],
        "delete_victim_module": [
            own,
            {
                **record("victim_jobs.py"),
                "kind": "deleted",
                "size": 0,
                "xxh3": "",
                "before": {
                    "kind": "file",
                    "size": len(victim_module),
                    "xxh3": xxhash.xxh3_128_hexdigest(victim_module),
                    "target": "",
                },
            },
        ],
    }


ATTACKS = sorted(attacks(Path("/x"), Path("/y")))
PG_ATTACKS = ["victim_module", "symlink_out"]


def _attack(
    tmp_path: Path,
    name: str,
    tamper: Callable[[list[dict[str, Any]]], int],
    plain: tuple[Any, dict[str, Any]],
    env: dict[str, str] | None = None,
) -> None:
    victim = victim_folder(tmp_path, "victim")
    manifest = attacks(victim, tmp_path / "outside")[name]
    plant_object(Path(os.environ["JOBFLOW_CACHE_DIR"]) / "objects", EVIL)
    before = folder_state(victim)
    outside_before = folder_state(tmp_path / "outside")
    assert tamper(manifest) >= 1

    output, counts, stderr = run_victim(tmp_path, victim, env=env)
    assert counts == {"victim_step": 1}, "the hit was refused: the job ran"
    assert output == plain[0]
    # a path through a symlink the victim's folder holds is a folder conflict (the folder
    # differs from the recorded one), a miss without a warning; everything else is refused
    assert stderr.count(WARNING) == (name != "through_symlinked_dir"), stderr[-3000:]
    after = folder_state(victim)
    assert after == plain[1], "as plain jobflow leaves it"
    assert {k: v for k, v in after.items() if k != "result.txt"} == before
    assert folder_state(tmp_path / "outside") == outside_before
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("name", ATTACKS)
def test_crafted_manifest_is_refused_on_sqlite(
    name: str, tmp_path: Path, isolated_cache: Path, recorded: tuple[Path, Any, dict[str, Any]]
) -> None:
    template, *plain = recorded
    shutil.copytree(template, isolated_cache)
    db = isolated_cache / "cache.sqlite"
    _attack(tmp_path, name, lambda files: tamper_sqlite(db, files), (plain[0], plain[1]))


@pytest.mark.parametrize("name", PG_ATTACKS)
def test_crafted_manifest_is_refused_on_postgres(
    name: str, tmp_path: Path, pg_spec: dict[str, Any], recorded: tuple[Path, Any, dict[str, Any]]
) -> None:
    env = {"JOBFLOW_CACHE_STORE": json.dumps(pg_spec)}
    first = tmp_path / "first"
    first.mkdir()
    assert run_victim(tmp_path, first, env=env)[1] == {"victim_step": 1}
    _attack(
        tmp_path,
        name,
        lambda files: tamper_postgres(pg_spec["uri"], pg_spec["table"], files),
        (recorded[1], recorded[2]),
        env=env,
    )


def test_code_files_are_not_recorded_unless_allowed(tmp_path: Path) -> None:
    """A job writing a module is not recorded (it runs each time, one warning each);
    with SERVE_CODE_FILES it is recorded and served, like any file it created."""
    run = tmp_path / "run"
    run.mkdir()
    area = ObjectArea(tmp_path / "objects")
    from jobflow_cache.files import snapshot

    before = snapshot(run)
    (run / "generated.py").write_text("X = 1\n")
    (run / "out.txt").write_text("x")
    with pytest.raises(Exception, match="SERVE_CODE_FILES is off"):
        area.record_changes(run, before, snapshot(run))
    assert list(area.iter_objects()) == [], "nothing stored for an entry never written"
    allowed = ObjectArea(tmp_path / "objects", serve_code=True)
    records = allowed.record_changes(run, before, snapshot(run))
    dest = tmp_path / "served"
    allowed.materialize(records, dest)
    assert (dest / "generated.py").read_text() == "X = 1\n"
    with pytest.raises(UnsafeManifestError, match="SERVE_CODE_FILES is off"):
        area.materialize(records, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_allowed_code_files_never_replace_one(tmp_path: Path) -> None:
    records = [
        FileRecord(
            path="victim_jobs.py",
            xxh3="0" * 32,
            size=3,
            before={"kind": "file", "size": 3, "xxh3": "1" * 32},  # type: ignore[arg-type]
        )
    ]
    with pytest.raises(UnsafeManifestError, match="did not create"):
        check_manifest(records, tmp_path, serve_code=True)


@pytest.mark.parametrize(
    ("target", "leaves"),
    [
        ("OUTCAR", False),
        ("../OUTCAR", False),  # from sub/link: the run folder
        ("../../x", True),
        ("a/../../x", True),
        ("/elsewhere", True),
        ("RUN/OUTCAR", False),
        ("RUN/../x", True),
        ("", True),
    ],
)
def test_symlink_targets_out_of_the_run_folder(tmp_path: Path, target: str, leaves: bool) -> None:
    target = target.replace("RUN", str(tmp_path))
    records = [FileRecord(path="sub/link", kind="symlink", target=target)]
    if leaves:
        with pytest.raises(UnsafeManifestError, match="out of the run folder"):
            check_manifest(records, tmp_path)
    else:
        assert check_manifest(records, tmp_path) == ["sub/link"]


# --------------------------------------------------------------------------- tampered objects


def objects_of(area: Path) -> list[Path]:
    return [p for p in area.glob("??/*") if p.is_file()]


def tamper_in_place(path: Path) -> None:
    """Change an object's bytes keeping its size and mtime (as bit rot or a careful edit)."""
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    with open(path, "r+b") as fh:
        fh.write(data)
    path.chmod(stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("files_mode", ["copy", "link"])
@pytest.mark.parametrize("memo", ["cold", "warm"])
def test_tampered_object_is_never_served(
    tmp_path: Path, isolated_cache: Path, files_mode: str, memo: str
) -> None:
    env = {"JOBFLOW_CACHE_FILES": files_mode}
    plain_folder = tmp_path / "plain"
    plain_folder.mkdir()
    plain, _, _ = run_victim(tmp_path, plain_folder, engine="plain")
    first = tmp_path / "first"
    first.mkdir()
    assert run_victim(tmp_path, first, env=env)[1] == {"victim_step": 1}
    (obj,) = objects_of(isolated_cache / "objects")
    if memo == "warm":  # a hit after the object settled: its stamp is memoised on this host
        time.sleep(2.1)
        warm = tmp_path / "warm"
        warm.mkdir()
        output, counts, stderr = run_victim(tmp_path, warm, env=env)
        assert (output, counts) == (plain, {})
        assert WARNING not in stderr
    tamper_in_place(obj)

    victim = tmp_path / "victim"
    victim.mkdir()
    output, counts, stderr = run_victim(tmp_path, victim, env=env)
    assert counts == {"victim_step": 1}, "not served: the job ran"
    assert output == plain
    assert stderr.count(WARNING) == 1, stderr[-3000:]
    assert folder_state(victim) == folder_state(plain_folder)

    # the damaged object was removed and a sound one recorded: the next run is served
    again = tmp_path / "again"
    again.mkdir()
    output, counts, stderr = run_victim(tmp_path, again, env=env)
    assert (output, counts) == (plain, {})
    assert WARNING not in stderr
    assert folder_state(again) == folder_state(plain_folder)
    area = ObjectArea(isolated_cache / "objects")
    assert all(
        area.verify(FileRecord(path="x", xxh3=digest, size=size)) is None
        for digest, size in area.iter_objects()
    )


def test_large_objects_beyond_the_limit_are_checked_by_their_seal(
    tmp_path: Path, isolated_cache: Path
) -> None:
    """Above VERIFY_FILES_LIMIT the cheaper check applies: a tamper that keeps the seal is
    not seen (documented), one that breaks it is, by the object's hash."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "big").write_bytes(b"x" * 5000)
    strict = ObjectArea(tmp_path / "objects")
    cheap = ObjectArea(tmp_path / "objects", verify_limit=1000)
    records = strict.record(run, ["big"])
    (obj,) = objects_of(tmp_path / "objects")
    tamper_in_place(obj)
    cheap.materialize(records, tmp_path / "cheap")
    assert (tmp_path / "cheap" / "big").read_bytes() != b"x" * 5000, "the documented limit"
    with pytest.raises(Exception, match="xxh3 mismatch"):
        strict.materialize(records, tmp_path / "strict")
    assert not (tmp_path / "strict" / "big").exists()
    assert objects_of(tmp_path / "objects") == [], "the damaged object was removed"


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_a_memo_others_can_write_is_not_used(tmp_path: Path, mode: int) -> None:
    """A digest planted in the host's memo would pass a tampered object (or a changed
    input) for sound: a memo file or folder that others can write is not used."""
    from jobflow_cache.hashing.contents import ContentMemo

    folder = tmp_path / "contents"
    folder.mkdir()
    private = ContentMemo(folder / "host.sqlite")
    assert private._connection() is not None
    private.close()
    folder.chmod(mode)
    shared = ContentMemo(folder / "host.sqlite")
    assert shared._connection() is None, "memory only"


# --------------------------------------------------------------------------- link mode, races


@pytest.fixture
def linking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hard links for files of any size, as a non-root user gets them for large files."""
    from jobflow_cache.files import materialize

    monkeypatch.setattr(materialize, "LINK_MIN_SIZE", 1)
    monkeypatch.setattr(materialize, "_may_link", lambda: True)


@pytest.mark.usefixtures("linking")
def test_link_mode_never_links_a_tampered_object(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "WAVECAR").write_bytes(b"w" * 4096)
    area = ObjectArea(tmp_path / "objects")
    records = area.record(run, ["WAVECAR"])
    (obj,) = objects_of(tmp_path / "objects")
    area.materialize(records, tmp_path / "sound", mode="link")
    assert os.stat(tmp_path / "sound" / "WAVECAR").st_ino == os.stat(obj).st_ino, "linked"
    tamper_in_place(obj)
    with pytest.raises(Exception, match="xxh3 mismatch"):
        area.materialize(records, tmp_path / "tampered", mode="link")
    assert not (tmp_path / "tampered" / "WAVECAR").exists()


@pytest.mark.usefixtures("linking")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the object to another user")
def test_link_mode_copies_an_object_of_another_user(tmp_path: Path) -> None:
    """Its owner could write into it after it is served: the run folder gets a copy."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "WAVECAR").write_bytes(b"w" * 4096)
    area = ObjectArea(tmp_path / "objects")
    records = area.record(run, ["WAVECAR"])
    (obj,) = objects_of(tmp_path / "objects")
    os.chown(obj, 65534, -1)
    area.materialize(records, tmp_path / "served", mode="link")
    served = tmp_path / "served" / "WAVECAR"
    assert served.read_bytes() == b"w" * 4096
    assert os.stat(served).st_ino != os.stat(obj).st_ino
    assert os.stat(served).st_uid == os.geteuid()


@pytest.mark.parametrize("appears", ["file", "symlink", "folder"])
def test_a_path_appearing_between_check_and_placing_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, appears: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "OUTCAR").write_bytes(b"energy\n")
    area = ObjectArea(tmp_path / "objects")
    records = area.record(run, ["OUTCAR"])
    dest = tmp_path / "dest"
    dest.mkdir()
    planned = ObjectArea._plan

    def plan_then_race(self: ObjectArea, *args: Any) -> Any:
        steps = planned(self, *args)
        if appears == "file":
            (dest / "OUTCAR").write_bytes(b"another job's\n")
        elif appears == "symlink":
            (dest / "OUTCAR").symlink_to(tmp_path / "elsewhere")
        else:
            (dest / "OUTCAR").mkdir()
        return steps

    monkeypatch.setattr(ObjectArea, "_plan", plan_then_race)
    from jobflow_cache.errors import FolderConflictError

    with pytest.raises(FolderConflictError, match="appeared"):
        area.materialize(records, dest)
    target = dest / "OUTCAR"
    if appears == "file":
        assert target.read_bytes() == b"another job's\n"
    elif appears == "symlink":
        assert target.is_symlink()
        assert not (tmp_path / "elsewhere").exists()
    else:
        assert target.is_dir()
    assert [p.name for p in dest.iterdir()] == ["OUTCAR"], "no temporary file left"


def test_byte_code_a_job_wrote_by_importing_is_left_out(tmp_path: Path) -> None:
    """A job importing a module of its folder makes Python write __pycache__: not a reason
    to leave the job uncached, and never served."""
    from jobflow_cache.files import snapshot

    run = tmp_path / "run"
    (run / "__pycache__").mkdir(parents=True)
    before = snapshot(run)
    (run / "__pycache__" / "helper.cpython-311.pyc").write_bytes(b"\x00" * 16)
    (run / "out.txt").write_text("x")
    records = ObjectArea(tmp_path / "objects").record_changes(run, before, snapshot(run))
    assert [r.path for r in records] == ["out.txt"]
