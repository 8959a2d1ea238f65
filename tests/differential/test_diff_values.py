"""Issue 11, class 3: values the job can tell apart must not share a digest.

Run 1 passes one value, run 2 a value equal to it under ``==`` but of another type (or time
zone, or dtype); the job's result depends on the difference, so the cache world must recompute.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.differential.harness import DECO, LOCAL, Scenario, cases, check_scenario

P = "tests.differential.programs:"
#: value scenarios do not depend on folders: the shared folder through both managers, and
#: one run with a folder per job
VALUE_VARIANTS = (*LOCAL[:1], *DECO[:1], "folders-local")

SCENARIOS = {
    "tuple_vs_list": Scenario(
        P + "tuple_vs_list",
        "(0, 1) then [0, 1] as a numpy index: one element, then two rows",
        ran={2: ["pick"]},
    ),
    "float32_vs_float": Scenario(
        P + "float32_vs_float",
        "np.float32(0.1) then float(np.float32(0.1)) (equal under ==): x / 3 differs",
        ran={2: ["third"]},
    ),
    "zone_vs_offset": Scenario(
        P + "zone_vs_offset",
        "a datetime in Europe/Paris then at a fixed +01:00 (equal): half a year later differs",
        ran={2: ["later"]},
    ),
    "int_vs_float": Scenario(
        P + "int_vs_float", "2 then 2.0", ran={2: ["describe"]}, variants=VALUE_VARIANTS[:2]
    ),
    "bool_vs_int": Scenario(
        P + "bool_vs_int", "True then 1", ran={2: ["describe"]}, variants=VALUE_VARIANTS[:2]
    ),
    "int64_vs_int": Scenario(
        P + "int64_vs_int", "np.int64(5) then 5", ran={2: ["describe"]}, variants=VALUE_VARIANTS
    ),
    "enum_vs_str": Scenario(
        P + "enum_vs_str",
        "a str Enum member then its value (equal under ==)",
        ran={2: ["describe"]},
        variants=VALUE_VARIANTS[:2],
    ),
    "str_subclass": Scenario(
        P + "str_subclass",
        "np.str_('fast') then 'fast' (equal under ==)",
        ran={2: ["describe"]},
        variants=VALUE_VARIANTS[:2],
    ),
    "negative_zero": Scenario(
        P + "negative_zero",
        "0.0 then -0.0: equal under == and of one type, yet copysign tells them apart",
        ran={2: ["sign"]},
        variants=VALUE_VARIANTS[:2],
    ),
    "array_dtype": Scenario(
        P + "array_dtype",
        "an int64 array then the same values as int32: x * 2**30 overflows only in int32",
        ran={2: ["scale_array"]},
        variants=VALUE_VARIANTS,
    ),
}
for _name in ("tuple_vs_list", "float32_vs_float", "zone_vs_offset"):
    SCENARIOS[_name] = Scenario(**{**SCENARIOS[_name].__dict__, "variants": VALUE_VARIANTS})


@pytest.mark.parametrize(("name", "variant"), cases(SCENARIOS))
def test_values(name: str, variant: str, tmp_path: Path) -> None:
    check_scenario(SCENARIOS[name], variant, tmp_path)
