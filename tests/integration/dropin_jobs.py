"""Jobs for the drop-in fidelity tests, equivalents of jobflow's ``tests/managers`` fixtures.

They live at module level so jobflow (and the cache) import them by path. Each one counts its
real executions through :func:`tests.support.jobs.executed`; jobs whose name starts with ``fail``
raise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from jobflow import CURRENT_JOB, Flow, JobConfig, Maker, Response, job
from monty.json import MSONable
from pydantic import BaseModel

from tests.support.jobs import executed


# -- jobflow's simple_job and the dynamic jobs built on it ----------------------------------------
@job
def append_end(message):
    executed("append_end")
    return message + "_end"


@job
def sum_with_addition(a, b):
    executed("sum_with_addition")
    return Response(output=a + b, addition=append_end(str(a + b)))


@job
def sum_with_detour(a, b):
    executed("sum_with_detour")
    return Response(output=a + b, detour=append_end(str(a + b)))


@job
def sum_with_replace(a, b):
    executed("sum_with_replace")
    return Response(output=a + b, replace=append_end(str(a + b)))


@job
def sum_replace_with_flow(a, b):
    """Replace itself with a two-job flow whose output is a dict of references."""
    executed("sum_replace_with_flow")
    first = append_end(str(a + b))
    second = append_end(first.output)
    flow = Flow([first, second], {"first": first.output, "second": second.output})
    return Response(output=a + b, replace=flow)


@job
def sum_replace_and_detour(a, b):
    executed("sum_replace_and_detour")
    return Response(output=a + b, replace=append_end(str(a + b)), detour=append_end("xyz"))


@job
def sum_detour_then_stop(a, b):
    executed("sum_detour_then_stop")
    return Response(output=a + b, detour=stop_jobflow_now())


@job
def returns_job(message):
    """Returning a Job (not a Response) is an implicit replace."""
    executed("returns_job")
    return append_end(message + "_implicit")


@job
def returns_job_list(n):
    """Returning a list of Jobs is an implicit replace with a list output."""
    executed("returns_job_list")
    return [append_end(str(i)) for i in range(n)]


@job
def stop_jobflow_now():
    executed("stop_jobflow_now")
    return Response(output="1234", stop_jobflow=True)


@job
def stop_children_now():
    executed("stop_children_now")
    return Response(output="1234", stop_children=True)


@job
def stored_data_job(message):
    executed("stored_data_job")
    return Response(output=message + "_end", stored_data={"a": "message"})


# -- failures -------------------------------------------------------------------------------------
@job
def fail_now():
    executed("fail_now")
    raise ValueError("errored")


@job
def fail_with_arg(value):
    executed("fail_with_arg")
    raise KeyError(f"no such key: {value}")


@job
def replace_with_failing(a):
    executed("replace_with_failing")
    return Response(output=a, replace=fail_with_arg(a))


@job
def detour_with_failing(a):
    executed("detour_with_failing")
    return Response(output=a, detour=fail_with_arg(a))


@job
def addition_with_failing(a):
    executed("addition_with_failing")
    return Response(output=a, addition=fail_with_arg(a))


@job
def unserializable():
    """Output jobflow cannot store: it raises 'Job output contained an object that is not ...'."""
    executed("fail_unserializable")
    return {"handle": object()}


# -- plain values ---------------------------------------------------------------------------------
@job
def describe(value):
    """What a job receives for a missing reference (None, an OutputReference, ...)."""
    executed("describe")
    return {"type": type(value).__name__, "is_none": value is None}


@job
def echo(value):
    executed("echo")
    return value


@job
def returns_none():
    executed("returns_none")


@job
def returns_dict():
    executed("returns_dict")
    return {"a": 1, "nested": {"b": [1, 2.5, "x", None], "c": True}, "empty": {}}


@job
def returns_list():
    executed("returns_list")
    return [1, "two", {"three": 3.0}, None, [4]]


@job
def returns_tuple():
    executed("returns_tuple")
    return (1, "two", 3.5)


@job
def returns_int_keys():
    executed("returns_int_keys")
    return {1: "one", 2: "two"}


@dataclass
class Point(MSONable):
    x: int
    y: float


@job
def returns_objects():
    """MSONable objects and a datetime (jobflow stores them jsanitized, returns them as is)."""
    executed("returns_objects")
    return {
        "point": Point(1, 2.5),
        "when": datetime(2020, 1, 2, 3, 4, 5),
        "points": [Point(2, 0.5)],
    }


@job
def own_uuid():
    """A job that records its own uuid in its output (like a TaskDoc)."""
    executed("own_uuid")
    return {"uuid": CURRENT_JOB.job.uuid, "index": CURRENT_JOB.job.index}


@job
def write_here(tag):
    """Write a file in the run folder and return the folder."""
    executed("write_here")
    Path(f"{tag}.txt").write_text(tag * 3)
    Path("sub").mkdir(exist_ok=True)
    Path("sub", f"{tag}.dat").write_bytes(tag.encode() * 5)
    return {"dir_name": os.getcwd(), "tag": tag}


@job
def read_here(info):
    executed("read_here")
    return Path(info["dir_name"], f"{info['tag']}.txt").read_text()


# -- output schema and additional stores ----------------------------------------------------------
class Spectrum(BaseModel):
    label: str
    items: list[float]


@job(output_schema=Spectrum, data="items")
def spectrum(label, n):
    """A pydantic output whose ``items`` go to the ``data`` additional store."""
    executed("spectrum")
    return Spectrum(label=label, items=[i / 2 for i in range(n)])


@job(output_schema=Spectrum)
def spectrum_from_dict(label):
    """A dict output converted by jobflow to the schema."""
    executed("spectrum_from_dict")
    return {"label": label, "items": [1.0, 2.0]}


@job(output_schema=Spectrum)
def spectrum_wrong():
    """An output that does not match the schema (jobflow raises ValueError)."""
    executed("fail_spectrum_wrong")
    return [1, 2, 3]


@job(data=True)
def big_list(n):
    """The whole output goes to the ``data`` additional store."""
    executed("big_list")
    return list(range(n))


# -- a Maker whose make is a plain @job -----------------------------------------------------------
@dataclass
class ScaleMaker(Maker):
    name: str = "scale"
    factor: int = 3

    @job
    def make(self, x):
        executed(self.name)
        return x * self.factor


# -- large and dynamic flows ----------------------------------------------------------------------
@job
def fan_replace(n, tag="f"):
    """Replace itself with ``n`` independent jobs (a dynamic fan-out) gathered into a list."""
    executed("fan_replace")
    jobs = [append_end(f"{tag}{i}") for i in range(n)]
    return Response(replace=Flow(jobs, output=[j.output for j in jobs]))


@job
def nested_fan(k, m):
    """Replace itself with ``k`` jobs that each replace themselves with ``m`` jobs."""
    executed("nested_fan")
    jobs = [fan_replace(m, tag=f"n{i}-") for i in range(k)]
    return Response(replace=Flow(jobs, output=[j.output for j in jobs]))


@job
def precise_times():
    """Datetimes that mongomock stores at millisecond precision and without time zone."""
    executed("precise_times")
    return {
        "naive": datetime(2020, 1, 2, 3, 4, 5, 678901),
        "aware": datetime(2020, 1, 2, 3, 4, 5, 123456, tzinfo=timezone(timedelta(hours=2))),
        "nested": [{"t": datetime(2021, 5, 6, 7, 8, 9, 999999)}],
    }


@job(config=JobConfig(expose_store=True))
def read_store(value, uuid):
    """Reads an upstream job's documents through ``CURRENT_JOB.store`` (``expose_store``)."""
    executed("read_store")
    store = CURRENT_JOB.store
    doc = store.query_one({"uuid": uuid}, properties=["index", "name"], sort={"index": -1})
    return {
        "value": value,
        "output": store.get_output(uuid),
        "count": store.count({"uuid": uuid}),
        "doc": {"index": doc["index"], "name": doc["name"]},
    }
