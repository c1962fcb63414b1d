"""What a run asks of this machine is judged where it starts, not when a Config is made."""

import pytest

from helpers import small_config
from pipeline.errors import ConfigError
from pipeline.run.resources import check_machine
from pipeline.sequential import SequentialTrainer


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine without a GPU")
def test_a_config_for_another_machine_is_made_but_a_run_on_this_one_is_refused_in_one_line(tmp_path):
    cfg = small_config(run__device="cuda", run__precision="bf16")  # a GPU run's config, e.g. read back from its summary
    with pytest.raises(ConfigError) as raised:
        check_machine(cfg)
    assert str(raised.value) == "--device cuda but no CUDA GPU is visible: use --device cpu"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        SequentialTrainer(cfg)


def test_missing_curve_keys_are_refused_where_the_run_starts(tmp_path):
    cfg = small_config(stages=2, pipeline__transport="zmq", pipeline__zmq_curve_keys=str(tmp_path))
    with pytest.raises(ConfigError, match="lacks server.key_secret, client.key_secret, authorized: make the keys"):
        check_machine(cfg)
