"""The trust check against the ecosystem a cache serves: atomate2 Makers, pymatgen, emmet, jobflow.

Every store's values pass :func:`jobflow_cache.trust.check_trusted` before they are decoded,
the embedded one included, so a class the check refuses is a *miss*: the job runs again, with
one warning, every time. These tests walk every atomate2 Maker that can be built with its
defaults, serialise it as a dynamic job's replay would (``codec.dumps``), and check it passes;
the few refusals left are listed with their reasons. The value-aware part of rule 5 (a
VASP input set reads ``prev_incar``/``prev_kpoints`` only when they name a file) is attacked:
a generator whose document names a file must still be refused.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import warnings
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from jobflow import Flow, Job, JobStore, Maker, Response, job
from maggma.stores import MemoryStore

from jobflow_cache import run_locally
from jobflow_cache.codec import dumps, loads
from jobflow_cache.errors import UntrustedValueError
from jobflow_cache.trust import check_trusted, class_problem, value_checks
from tests.support import jobs

pytest.importorskip("atomate2")

from atomate2.vasp.jobs.core import RelaxMaker, StaticMaker
from atomate2.vasp.sets.core import RelaxSetGenerator
from pymatgen.core import Lattice, Structure
from pymatgen.core.structure_matcher import AbstractComparator
from pymatgen.io.vasp.inputs import Incar, Kpoints

#: Maker classes of atomate2 that cannot be built with their defaults (abstract, or
#: required arguments): nothing to serialise, so nothing to check. Listed so a new one shows.
NOT_BUILT_WITH_DEFAULTS = {
    "atomate2.common.flows.elastic.BaseElasticMaker",  # abstract
    "atomate2.common.flows.gruneisen.BaseGruneisenMaker",  # abstract
    "atomate2.common.flows.mpmorph.EquilibriumVolumeMaker",  # md_maker required
    "atomate2.common.flows.mpmorph.FastQuenchMaker",  # relax_maker, static_maker required
    "atomate2.common.flows.mpmorph.MPMorphMDMaker",  # abstract
    "atomate2.common.flows.mpmorph.SlowQuenchMaker",  # abstract
    "atomate2.common.flows.phonons.BasePhononMaker",  # abstract
    "atomate2.common.flows.qha.CommonQhaMaker",  # abstract
    "atomate2.common.jobs.transform.SQS",  # its default transformation is no callable
    "atomate2.common.jobs.transform.Transformer",  # transformation required
    "atomate2.forcefields.flows.qha.ForceFieldQhaMaker",  # fails in __post_init__
    "atomate2.jdftx.jobs.adsorption.MolMinMaker",  # its default generator is no callable
    "atomate2.lammps.jobs.core.CustomLammpsMaker",  # an input file is required
}

#: atomate2 Makers the check refuses, with why (each a deliberate refusal). None today.
REFUSED_MAKERS: dict[str, str] = {}

#: Classes of jobflow, emmet and atomate2 (pydantic models and MSONables) refused, and why.
REFUSED_CLASSES = {
    "atomate2.settings.Atomate2Settings": "BaseSettings: reads the environment and files",
    "emmet.core.settings.EmmetSettings": "BaseSettings: reads the environment and files",
    "emmet.core.connectors.icsd.settings.IcsdClientSettings": "BaseSettings",
    "emmet.core.connectors.icsd.schemas.IcsdPropertyDoc": (
        "its validator writes the CIF text to a temporary file and runs the COD tools parser"
    ),
    "jobflow.core.store.JobStore": "a store: connects to databases",
    "jobflow.settings.JobflowSettings": "decodes the YAML file named by CONFIG_FILE",
}


def _modules(package: str) -> list[Any]:
    """``package`` and its submodules that import here (optional dependencies missing are
    skipped: their Makers cannot be in a replay made on this machine either)."""
    try:
        top = importlib.import_module(package)
    except ImportError:
        return []
    found = [top]
    for info in pkgutil.walk_packages(getattr(top, "__path__", []), package + "."):
        try:
            found.append(importlib.import_module(info.name))
        except Exception:
            continue
    return found


@pytest.fixture(scope="module")
def atomate2_makers() -> dict[str, type]:
    import atomate2

    makers: dict[str, type] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for info in pkgutil.iter_modules(atomate2.__path__, "atomate2."):
            for part in ("jobs", "flows"):
                for module in _modules(f"{info.name}.{part}"):
                    for value in vars(module).values():
                        if (
                            isinstance(value, type)
                            and issubclass(value, Maker)
                            and value.__module__ == module.__name__
                        ):
                            makers[f"{value.__module__}.{value.__qualname__}"] = value
    return makers


@pytest.fixture(scope="module")
def si() -> Structure:
    return Structure(Lattice.cubic(5.43), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])


def _refusal(value: Any) -> str | None:
    try:
        check_trusted(json.loads(dumps(value)))
    except UntrustedValueError as err:
        return str(err)
    return None


# -- every atomate2 Maker ------------------------------------------------------------------
@pytest.mark.slow  # importing every atomate2 jobs/flows module: ~3 s alone, more under load
def test_every_atomate2_maker_passes_the_check(atomate2_makers: dict[str, type]) -> None:
    assert len(atomate2_makers) > 100, "the walk found too few Makers"
    vasp = [name for name in atomate2_makers if name.startswith("atomate2.vasp.")]
    assert len(vasp) > 40
    built, refused, not_built = 0, {}, set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cls in sorted(atomate2_makers.items()):
            try:
                maker = cls()
            except Exception:
                not_built.add(name)
                continue
            built += 1
            problem = _refusal(maker)
            if problem:
                refused[name] = problem
    assert refused.keys() == REFUSED_MAKERS.keys(), json.dumps(refused, indent=1)
    assert not_built == NOT_BUILT_WITH_DEFAULTS
    assert built > 150


def test_vasp_makers_inside_jobs_flows_and_responses_pass(si: Structure) -> None:
    relax = RelaxMaker().make(si)
    flow = Flow([relax, StaticMaker().make(relax.output.structure)])
    for value in (
        relax,
        flow,
        Response(replace=flow),
        Response(addition=relax, output={"structure": si}),
        {"replace": Flow([RelaxMaker(name="x").make(si)]), "structure": si},
    ):
        text = dumps(value)
        assert "RelaxSetGenerator" in text
        check_trusted(json.loads(text))
        back = loads(text)
        assert type(back) is type(value)
    decoded = loads(dumps(Response(replace=flow)))
    maker = decoded.replace.jobs[0].function.__self__
    assert isinstance(maker, RelaxMaker)
    assert isinstance(maker.input_set_generator, RelaxSetGenerator)
    assert maker.input_set_generator.prev_incar is None


def test_structures_and_task_documents_pass(si: Structure) -> None:
    from emmet.core.tasks import TaskDoc
    from emmet.core.vasp.calculation import Calculation

    task = TaskDoc(
        structure=si,
        task_label="relax",
        calcs_reversed=[],  # emmet's own validator fails to rebuild a TaskDoc without
        output={"structure": si, "energy": -10.8},
    )
    for value in (si, task, {"doc": task, "list": [si, si.lattice]}):
        check_trusted(json.loads(dumps(value)))
    assert loads(dumps(task)).structure == si
    for cls in (TaskDoc, Calculation, Structure, Job, Flow, Response):
        assert class_problem(cls) is None, class_problem(cls)
        assert value_checks(cls) == []


def test_refused_classes_are_the_listed_ones() -> None:
    """Every pydantic/MSON class of jobflow, emmet's task documents, atomate2's schemas and
    input sets and pymatgen's core that the check refuses is one refused on purpose."""
    from monty.json import MSONable
    from pydantic import BaseModel

    seen: dict[str, type] = {}
    packages = (
        "jobflow",
        "emmet.core.tasks",
        "emmet.core.vasp",
        "emmet.core.structure",
        "emmet.core.settings",
        "atomate2.settings",
        "atomate2.vasp.sets",
        "atomate2.vasp.schemas",
        "atomate2.common.schemas",
        "atomate2.forcefields.schemas",
        "pymatgen.io.vasp.sets",
        "pymatgen.core",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for package in packages:
            for module in _modules(package):
                for value in vars(module).values():
                    if (
                        isinstance(value, type)
                        and issubclass(value, (BaseModel, MSONable))
                        and value.__module__ == module.__name__
                    ):
                        seen[f"{value.__module__}.{value.__qualname__}"] = value
    assert len(seen) > 200
    refused = {name: class_problem(cls) for name, cls in seen.items() if class_problem(cls)}
    assert set(refused) <= set(REFUSED_CLASSES), json.dumps(refused, indent=1)
    assert "atomate2.settings.Atomate2Settings" in refused
    gated = [name for name, cls in seen.items() if value_checks(cls)]
    assert "atomate2.vasp.sets.core.RelaxSetGenerator" in gated
    assert "pymatgen.core.structure_matcher.ElementComparator" in gated


# -- rule 5, value-aware: VASP input sets --------------------------------------------------
def _generator_document(**fields: Any) -> dict[str, Any]:
    document = json.loads(dumps(RelaxSetGenerator()))
    document.update(fields)
    return document


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prev_incar", "/etc/passwd"),
        ("prev_incar", "INCAR"),
        ("prev_kpoints", "/etc/passwd"),
        ("prev_incar", {"@module": "pathlib", "@class": "Path", "string": "/etc/passwd"}),
        ("prev_kpoints", {"@module": "pathlib", "@class": "PosixPath", "string": "/etc/passwd"}),
        ("prev_incar", {"@module": "tests.test_trust_ecosystem", "@class": "Name", "value": "x"}),
        ("prev_incar", {"@module": "builtins", "@class": "str"}),
        ("prev_incar", {"@module": "tests.support.jobs", "@callable": "add"}),
        ("prev_incar", ["/etc/passwd"]),
        ("prev_incar", {"$symbol": "/etc/passwd"}),  # bson's decoder makes it a str
        ("prev_kpoints", {"$binary": {"base64": "L2V0Yy9wYXNzd2Q=", "subType": "00"}}),
        ("prev_incar", {"@module": "no_such_module_here", "@class": "X"}),
    ],
)
def test_generator_naming_a_file_is_refused(field: str, value: Any, si: Structure) -> None:
    document = _generator_document(**{field: value})
    with pytest.raises(UntrustedValueError, match=field):
        check_trusted(document)
    # as deep as a replay holds it: a Maker's generator, inside a job, inside a response
    maker = json.loads(dumps(Response(replace=RelaxMaker().make(si))))
    text = json.dumps(maker)
    generator = json.dumps(json.loads(dumps(RelaxSetGenerator())))
    assert generator in text
    with pytest.raises(UntrustedValueError, match=field):
        check_trusted(json.loads(text.replace(generator, json.dumps(document))))


@pytest.mark.parametrize("form", ["str", "$symbol"])
def test_the_refused_generator_would_really_read_the_file(form: str, tmp_path: Path) -> None:
    """Decoded without the check (by the decoder codec.loads uses), a generator whose
    prev_incar names a file reads it: the refusals above stop a real read."""
    from jobflow_cache.codec import _DECODER

    secret = tmp_path / "secret"
    secret.write_text("SECRET_KEY = 42\n")
    value = str(secret) if form == "str" else {"$symbol": str(secret)}
    document = _generator_document(prev_incar=value)
    with pytest.raises(UntrustedValueError):
        check_trusted(document)
    decoded = _DECODER.decode(json.dumps(document))
    assert isinstance(decoded.prev_incar, Incar)
    assert decoded.prev_incar["SECRET_KEY"] == 42


@pytest.mark.parametrize(
    ("prev_incar", "prev_kpoints"),
    [
        (None, None),
        (Incar({"ENCUT": 520, "ISMEAR": 0}), Kpoints.gamma_automatic((2, 2, 2))),
        ({"ENCUT": 520}, None),
    ],
)
def test_generator_holding_documents_is_served(prev_incar: Any, prev_kpoints: Any) -> None:
    generator = RelaxSetGenerator(prev_incar=prev_incar, prev_kpoints=prev_kpoints)
    text = dumps({"generator": generator})
    check_trusted(json.loads(text))
    back = loads(text)["generator"]
    assert isinstance(back, RelaxSetGenerator)
    assert back.prev_incar == prev_incar
    assert back.prev_kpoints == prev_kpoints


def test_an_incar_document_holding_a_bad_node_is_still_refused() -> None:
    bad = {"@module": "jobflow.settings", "@class": "JobflowSettings", "CONFIG_FILE": "x.yaml"}
    incar = json.loads(dumps(Incar({"ENCUT": 520})))
    incar["ENCUT"] = bad
    with pytest.raises(UntrustedValueError, match="JobflowSettings"):
        check_trusted(_generator_document(prev_incar=incar))


class Name(str, Enum):
    """A str Enum: a member is a str, so ``Incar.from_file`` would open a file by its value."""

    X = "x"


@dataclasses.dataclass
class ReadsByDefault(RelaxSetGenerator):
    """A subclass whose default would make decoding read a file when the field is absent."""

    prev_incar: Any = "INCAR"


def test_subclass_with_a_file_name_default_is_refused() -> None:
    assert value_checks(ReadsByDefault)  # matched by MRO
    document = json.loads(dumps(RelaxSetGenerator()))
    document.pop("prev_incar")
    check_trusted(document)  # the base class's default is None
    document["@module"], document["@class"] = __name__, "ReadsByDefault"
    with pytest.raises(UntrustedValueError, match="prev_incar"):
        check_trusted(document)


@dataclasses.dataclass
class ReadsItself(RelaxSetGenerator):
    """A subclass that adds a read of its own: the reviewed base does not excuse it."""

    notes: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.notes = Path(self.notes).read_text() if self.notes else ""


def test_subclass_reading_more_is_refused() -> None:
    problem = class_problem(ReadsItself)
    assert problem is not None
    assert "read_text" in problem


def test_gated_verdicts_are_never_memoised_per_class() -> None:
    """A sound document of a class is no pass for the next document of that class."""
    check_trusted(_generator_document())
    with pytest.raises(UntrustedValueError):
        check_trusted(_generator_document(prev_incar="/etc/passwd"))


# -- rule 5, value-aware: structure matcher comparators ------------------------------------
class Sneaky(AbstractComparator):
    """Decoded by AbstractComparator.from_dict, which looks its @class up elsewhere."""

    def are_equal(self, sp1: Any, sp2: Any) -> bool:
        return True

    def get_hash(self, composition: Any) -> Any:
        return 0


def test_structure_matcher_comparators() -> None:
    from pymatgen.core.structure_matcher import ElementComparator, StructureMatcher

    matcher = StructureMatcher(comparator=ElementComparator())
    text = dumps({"matcher": matcher})
    check_trusted(json.loads(text))
    assert isinstance(loads(text)["matcher"]._comparator, ElementComparator)
    with pytest.raises(UntrustedValueError, match="AbstractComparator"):
        check_trusted({"@module": __name__, "@class": "Sneaky"})


def test_reviewed_code_is_the_code_installed() -> None:
    """Each reviewed decoder's code reads what it read when reviewed (else the exception does
    not apply and the class is refused: re-read the new code and add its fingerprint)."""
    from jobflow_cache.trust import _REVIEWED, _fingerprint

    for (module, qualname), entry in _REVIEWED.items():
        owner = importlib.import_module(module)
        func: Any = owner
        for part in qualname.split("."):
            func = getattr(func, part)
        func = getattr(func, "__func__", func)
        assert _fingerprint(func.__code__) in entry.fingerprints, (module, qualname)
        assert entry.owner == f"{module}.{qualname.rpartition('.')[0]}"


# -- end to end: a dynamic job whose replay holds a VASP Maker ----------------------------
@job
def plan_relax(structure: Structure) -> Response:
    """Replace itself with atomate2's VASP relaxation of ``structure``."""
    jobs.executed("plan_relax")
    return Response(replace=RelaxMaker().make(structure))


def _run(flow: Flow, **kwargs: Any) -> tuple[dict, list[str], JobStore]:
    store = JobStore(MemoryStore())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        responses = run_locally(flow, store=store, log=False, ensure_success=False, **kwargs)
    return responses, [str(w.message) for w in caught if "jobflow-cache" in str(w.message)], store


def _replacements(responses: dict, planner: Job) -> list[Any]:
    replace = responses[planner.uuid][1].replace
    return list(replace.jobs) if isinstance(replace, Flow) else [replace]


def test_dynamic_vasp_replay_is_served(counts, cache_store, run_dir, si: Structure) -> None:
    """The planner runs once; its replay (a RelaxMaker job, whose generator is a
    RelaxSetGenerator) is served in the next run with no warning, and the replacement is the
    same VASP job. It never runs VASP: there is no VASP here, so the relaxation fails the same
    way in every run, under plain jobflow too (the differential)."""
    from jobflow import run_locally as plain_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain_planner = plan_relax(si)
        plain = plain_run(Flow([plain_planner]), store=JobStore(MemoryStore()), log=False)
    assert counts() == {"plan_relax": 1}

    runs = []
    for _ in range(2):
        planner = plan_relax(si)
        runs.append((planner, *_run(Flow([planner]), cache=cache_store)))
    assert counts() == {"plan_relax": 2}, "the second run served the planner"
    for planner, responses, caught, _store in runs:
        assert caught == [], caught
        new = _replacements(responses, planner)
        assert [type(j) for j in new] == [Job]
        assert new[0].name == "relax"
        maker = new[0].function.__self__
        assert isinstance(maker, RelaxMaker)
        assert isinstance(maker.input_set_generator, RelaxSetGenerator)
        assert set(responses) == {planner.uuid}  # the relaxation failed: no VASP here
    plain_new = _replacements(plain, plain_planner)
    served_new = _replacements(runs[1][1], runs[1][0])
    assert [j.name for j in served_new] == [j.name for j in plain_new]
    assert served_new[0].function.__self__ == plain_new[0].function.__self__
    assert set(plain) == {plain_planner.uuid}


FRESH = """
import json, warnings
from jobflow import Flow
from pymatgen.core import Lattice, Structure
from jobflow_cache import run_locally
from tests.test_trust_ecosystem import plan_relax
si = Structure(Lattice.cubic(5.43), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    planner = plan_relax(si)
    responses = run_locally(Flow([planner]), log=False, ensure_success=False)
replace = responses[planner.uuid][1].replace
new = list(replace.jobs) if isinstance(replace, Flow) else [replace]
print("RESULT:" + json.dumps({
    "types": [type(j).__name__ for j in new],
    "names": [j.name for j in new],
    "generator": type(new[0].function.__self__.input_set_generator).__name__,
    "warnings": [str(w.message) for w in caught if "jobflow-cache" in str(w.message)],
}))
"""


@pytest.mark.slow  # fresh processes importing atomate2
def test_dynamic_vasp_replay_is_served_in_a_fresh_process(counts) -> None:
    """The same, each run in a fresh Python process on the embedded store (the default): no
    verdict is memoised from the run that recorded the entry."""
    from tests.conftest import run_python

    results = []
    for _ in range(2):
        out = run_python(FRESH)
        results.append(json.loads(out.rsplit("RESULT:", 1)[1]))
    assert counts() == {"plan_relax": 1}, "the second process served the planner"
    for result in results:
        assert result["warnings"] == []
        assert result["types"] == ["Job"]
        assert result["names"] == ["relax"]
        assert result["generator"] == "RelaxSetGenerator"
