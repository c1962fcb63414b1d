"""The injected faults and stops: read once from the environment into a Hooks object, each for its own stage."""

import pytest

from pipeline.errors import ConfigError
from pipeline.run.faults import FAULT_ENV, STOP_ENV, Hooks


def test_the_environment_is_parsed_once_into_hooks():
    hooks = Hooks.from_env({FAULT_ENV: "1:7:nan", STOP_ENV: "2:150"})
    assert hooks == Hooks(fail_stage=1, fail_batch=7, fail_mode="nan", stop_at=(2, 150))
    assert hooks.stops_before(2, 150) and not hooks.stops_before(2, 149) and not hooks.stops_before(1, 150)
    assert hooks.fault(1).batch == 7 and hooks.fault(1).mode == "nan"
    assert hooks.fault(0).batch is None and hooks.fault(2).batch is None  # the other stages suffer nothing
    assert Hooks.from_env({FAULT_ENV: "0:3"}).fault(0).mode == "raise"
    assert Hooks.from_env({}) == Hooks() and Hooks().fault(0).batch is None and not Hooks().stops_before(1, 0)


@pytest.mark.parametrize("env", [{FAULT_ENV: "1"}, {FAULT_ENV: "a:3"}, {FAULT_ENV: "1:3:melt"}, {STOP_ENV: "2"},
                                 {STOP_ENV: "2:x"}])
def test_a_malformed_hook_is_one_config_error(env):
    with pytest.raises(ConfigError) as info:
        Hooks.from_env(env)
    assert "\n" not in str(info.value) and (FAULT_ENV in str(info.value))
