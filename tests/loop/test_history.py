"""A resumed run with changed settings: the allowed ones are said and kept in config.yaml's
history; the optimizer's own and the seed are refused."""

import pytest
import yaml
from runs import losses, train

COMMON = ("precision=fp32", "save_every=2", "eval_every=100", "export_hf=false")


@pytest.mark.slow
def test_resume_lists_what_changed_keeps_it_and_refuses_what_may_not_change(tmp_path, corpus):
    run = tmp_path / "run"
    train(run, corpus, *COMMON, "max_steps=2", "optim.lr=3e-3")

    proc = train(run, corpus, *COMMON, "max_steps=4", "optim.lr=1e-3")
    said = proc.stdout + proc.stderr
    change = "max_steps: 2 -> 4; optim.lr: 0.003 -> 0.001"
    assert f"resuming at step 2 with changed settings: {change}" in said, said
    config = (run / "config.yaml").read_text()
    assert yaml.safe_load(config)["optim"]["lr"] == 0.001
    assert f"# changed at step 2: {change} (before: config_history/until_step_00000002.yaml)" in (
        config
    )
    before = yaml.safe_load((run / "config_history" / "until_step_00000002.yaml").read_text())
    assert before["optim"]["lr"] == 0.003 and before["max_steps"] == 2
    assert sorted(losses(run)) == [1, 2, 3, 4]

    refused = train(
        run, corpus, *COMMON, "max_steps=6", "optim.lr=1e-3", "optim.weight_decay=0", check=False
    )
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert "resuming at step 4 with optim.weight_decay: 0.1 -> 0.0" in refused.stderr

    # The same settings again: nothing new is noted, the earlier note stays.
    train(run, corpus, *COMMON, "max_steps=4", "optim.lr=1e-3")
    config = (run / "config.yaml").read_text()
    assert config.count("# changed at") == 1 and len(list((run / "config_history").iterdir())) == 1


def test_a_key_added_since_the_run_started_is_its_default_then(tmp_path):
    """A run written before optim.name existed trained with AdamW: resuming it with the default
    notes nothing; with optim.name=muon, the change is refused like any optimizer change."""
    from dataclasses import asdict, replace

    from omegaconf import OmegaConf

    from train.config.run import OptimConfig
    from train.config.train import TrainConfig
    from train.errors import ConfigError
    from train.loop.history import changes

    old = asdict(TrainConfig())
    for key in ("name", "schedule", "cooldown", "muon_lr", "momentum"):
        del old["optim"][key]
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    assert changes(TrainConfig(), tmp_path, 10) == []
    muon = replace(TrainConfig(), optim=OptimConfig(name="muon"))
    with pytest.raises(ConfigError, match="optim.name: adamw -> muon"):
        changes(muon, tmp_path, 10)


@pytest.mark.parametrize(
    "before, now, shown",
    [
        ({"type": "reward"}, {"type": "classification"}, "head.type: reward -> classification"),
        ({"type": "entailment"}, {"type": "entailment", "special_tokens": "map"}, "special_tok"),
        ("lora", None, "lora.r: 4 -> 0"),
    ],
)
def test_a_resume_with_another_head_or_other_adapters_is_refused(tmp_path, before, now, shown):
    """The head and the adapters are the model being trained: another head type, tokens or
    LoRA shape cannot continue the run (it failed with a traceback loading the checkpoint's
    tensors into the other model)."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from train.config.finetune import LoraConfig
    from train.config.sft import HeadConfig, SftConfig
    from train.errors import ConfigError
    from train.loop.history import changes

    if before == "lora":
        old, new = SftConfig(lora=LoraConfig(r=4)), SftConfig()
    else:
        old, new = SftConfig(head=HeadConfig(**before)), SftConfig(head=HeadConfig(**now))
    OmegaConf.save(OmegaConf.create(asdict(old)), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=shown):
        changes(new, tmp_path, 3)
    # lm_coef and the reward centering are loss weights: changed, said, allowed like the lr
    weights = SftConfig(head=HeadConfig(type="reward", center_rewards_coefficient=0.01))
    OmegaConf.save(
        OmegaConf.create(asdict(SftConfig(head=HeadConfig(type="reward")))),
        tmp_path / "config.yaml",
    )
    assert changes(weights, tmp_path, 3) == ["head.center_rewards_coefficient: None -> 0.01"]
