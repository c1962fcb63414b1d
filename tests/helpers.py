"""Helpers shared by the tests: small, fast configs on synthetic data."""

from pipeline.config import Config, DataConfig, LossConfig, ModelConfig, OptimConfig, PipelineConfig, RunConfig


def small_config(model="mlp", loss="predsim", like="mnist", stages=1, **overrides) -> Config:
    """A fast config on synthetic data; overrides are (section, field) pairs given as section__field=value."""
    sections = {
        "model": dict(name=model, num_layers=2, num_hidden=32, dropout=0.1, nonlin="leakyrelu"),
        "loss": dict(loss=loss),
        "optim": dict(lr=1e-3),
        "data": dict(dataset="synthetic", synthetic_like=like, synthetic_train_size=256, synthetic_test_size=64, batch_size=32),
        "pipeline": dict(stages=stages),
        "run": dict(epochs=1, seed=3, threads=1, progress=False),
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        sections[section][name] = value
    return Config(model=ModelConfig(**sections["model"]), loss=LossConfig(**sections["loss"]),
                  optim=OptimConfig(**sections["optim"]), data=DataConfig(**sections["data"]),
                  pipeline=PipelineConfig(**sections["pipeline"]), run=RunConfig(**sections["run"]))
