"""Failure injection for jobflow-remote workers (tests/managers/test_jobflow_remote.py).

``jf execution run`` is a fresh process started by the worker's ``submit.sh``: nothing of the
test process reaches it but its environment. With this folder on ``PYTHONPATH``, Python imports
this module at start-up; when ``JFC_A2_FAIL`` names an atomate2 job, the ASE relaxation of that
job raises (:func:`tests.integration.a2_flows.fail_job_named`, which patches a helper the job
calls, never the job function: the job's digest is unchanged). Without the variable it does
nothing.
"""

import os

if os.environ.get("JFC_A2_FAIL"):
    from tests.integration.a2_flows import fail_job_named

    fail_job_named(os.environ["JFC_A2_FAIL"])
