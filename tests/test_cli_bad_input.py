"""Every command with bad values: exit code 2, one line of error naming the option and what it takes, no
traceback, and no file written (the values are checked before any run directory, model load or data pass).

Each row is (command, the option under test with its bad value, a fragment the error must hold). Paths the
commands need (a model, a reward model) do not exist: a bad value must be reported before they are read.
"""

from __future__ import annotations

import pytest
from test_cli import run_main

MODEL = ["--base", "no-model"]
REWARD = ["--base", "no-model", "--reward", "no-reward-model"]
TABLE = [
    # the audit
    ("audit", ["--seed", "-1"], "--seed: expected an integer >= 0, got -1"),
    ("audit", ["--device", "tpu"], "--device: expected auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    ("audit", ["--config", "no-such.yaml"], "no-such.yaml: no such config file"),
    # the world
    ("world sample", ["--n", "0"], "--n: expected an integer >= 1, got 0"),
    ("world sample", ["--split", "dev"], "--split: expected one of train, test, got 'dev'"),
    ("world sample", ["--kind", "poetry"], "--kind: expected one of arithmetic"),
    ("world sample", ["--style", "rhymes"], "unknown style 'rhymes'"),
    ("world sample", ["--seed", "-3"], "--seed: expected an integer >= 0, got -3"),
    ("world preferences", ["--labeler", "perfect"], "--labeler: expected one of ideal, careful, typical"),
    ("world preferences", ["--n", "-5"], "--n: expected an integer >= 1, got -5"),
    ("world preferences", ["--split", "valid"], "--split: expected one of train, test"),
    ("world preferences", ["--seed", "-1"], "--seed: expected an integer >= 0"),
    ("world judge no-such.jsonl", [], "no-such.jsonl: no such file"),
    ("world probe-judge", ["--per-kind", "0"], "--per-kind: expected an integer >= 1, got 0"),
    ("world probe-judge", ["--seed", "-1"], "--seed: expected an integer >= 0"),
    ("world judge no-such.jsonl", ["--seed", "-1"], "--seed: expected an integer >= 0"),
    # training
    ("train base", ["--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    ("train base", ["--conversations", "0"], "--conversations: expected an integer >= 1"),
    ("train base", ["--device", "gpu"], "--device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("train base", ["--seed", "-1"], "--seed: expected an integer >= 0"),
    ("train sft", [*MODEL, "--steps", "-2"], "--steps: expected an integer >= 1, got -2"),
    ("train sft", [*MODEL, "--n", "0"], "--n: expected an integer >= 1"),
    ("train sft", [*MODEL, "--seed", "-1"], "--seed: expected an integer >= 0"),
    ("train sft", [*MODEL, "--device", "cuda:x"], "--device: expected auto, cpu, cuda, cuda:N or mps"),
    ("train rm", [*MODEL, "--members", "0"], "--members: expected an integer >= 1, got 0"),
    ("train rm", [*MODEL, "--pooling", "max"], "--pooling: expected one of auto, last, mean, first, got 'max'"),
    ("train rm", [*MODEL, "--lr", "-1"], "--lr: expected a finite number > 0, got -1.0"),
    ("train rm", [*MODEL, "--labeler", "perfect"], "--labeler: expected one of ideal, careful, typical"),
    ("train rm", [*MODEL, "--n", "0"], "--n: expected an integer >= 1"),
    ("train rm", [*MODEL, "--steps", "0"], "--steps: expected an integer >= 1"),
    ("train rm", [*MODEL, "--seed", "-1"], "--seed: expected an integer >= 0"),
    ("train rm", [*MODEL, "--device", "tpu"], "--device: expected auto, cpu, cuda, cuda:N or mps"),
    ("train dpo", [*MODEL, "--beta", "0"], "--beta: expected a finite number > 0"),
    ("train dpo", [*MODEL, "--beta", "-0.1"], "--beta: expected a finite number > 0"),
    ("train dpo", [*MODEL, "--beta", "nan"], "--beta: expected a finite number > 0"),
    ("train dpo", [*MODEL, "--label-smoothing", "0.5"], "--label-smoothing: expected a probability in [0, 0.5)"),
    ("train dpo", [*MODEL, "--loss", "hinge", "--label-smoothing", "0.1"],
     "--label-smoothing: expected 0 for the hinge loss"),
    ("train dpo", [*MODEL, "--lr", "-1"], "--lr: expected a finite number > 0"),
    ("train dpo", [*MODEL, "--rpo-alpha", "-1"], "--rpo-alpha: expected a finite number >= 0"),
    ("train dpo", [*MODEL, "--gamma", "-1"], "--gamma: expected a finite number >= 0"),
    ("train dpo", [*MODEL, "--loss", "kto"], "--loss: expected one of sigmoid, robust, ipo, hinge, simpo"),
    ("train dpo", [*MODEL, "--steps", "0"], "--steps: expected an integer >= 1"),
    ("train dpo", [*MODEL, "--labeler", "perfect"], "--labeler: expected one of ideal, careful, typical"),
    ("train dpo", [*MODEL, "--n", "0"], "--n: expected an integer >= 1"),
    ("train dpo", [*MODEL, "--seed", "-1"], "--seed: expected an integer >= 0"),
    ("train dpo", [*MODEL, "--device", "tpu"], "--device: expected auto, cpu, cuda, cuda:N or mps"),
    ("train rloo", [*REWARD, "--k", "1"], "--k: expected an integer >= 2"),
    ("train rloo", [*REWARD, "--kl-coef", "-0.1"], "--kl-coef: expected a finite number >= 0"),
    ("train rloo", [*REWARD, "--lr", "0"], "--lr: expected a finite number > 0"),
    ("train rloo", [*REWARD, "--prompts-per-kind", "0"], "--prompts-per-kind: expected an integer >= 1"),
    ("train rloo", [*REWARD, "--steps", "0"], "--steps: expected an integer >= 1"),
    ("train rloo", [*REWARD, "--seed", "-1"], "--seed: expected an integer >= 0"),
    ("train ppo", [*REWARD, "--ppo-epochs", "0"], "--ppo-epochs: expected an integer >= 1"),
    ("train ppo", [*REWARD, "--mini-batches", "0"], "--mini-batches: expected an integer >= 1"),
    ("train ppo", [*REWARD, "--mini-batches", "64"], "--mini-batches: expected at most the prompts per rollout"),
    ("train ppo", [*REWARD, "--kl-coef", "-1"], "--kl-coef: expected a finite number >= 0"),
    ("train ppo", [*REWARD, "--kl-target", "-1"], "--kl-target: expected a finite number >= 0"),
    ("train ppo", [*REWARD, "--kl-coef", "0", "--kl-target", "6"], "--kl-coef: expected a number > 0 to adapt"),
    ("train ppo", [*REWARD, "--steps", "0"], "--steps: expected an integer >= 1"),
    ("train ppo", [*REWARD, "--lr", "-1"], "--lr: expected a finite number > 0"),
    ("train ppo", [*REWARD, "--prompts-per-kind", "0"], "--prompts-per-kind: expected an integer >= 1"),
    ("train ppo", [*REWARD, "--device", "tpu"], "--device: expected auto, cpu, cuda, cuda:N or mps"),
    # sampling and evaluation
    ("sample best-of-n", ["--policy", "p", "--reward", "r", "--n", "0"], "--n: expected integers >= 1, got 0"),
    ("sample best-of-n", ["--policy", "p", "--reward", "r", "--per-kind", "0"], "--per-kind: expected an integer >= 1"),
    ("sample best-of-n", ["--policy", "p", "--reward", "r", "--jailbroken", "-1"], "--jailbroken: expected an "
                                                                                  "integer >= 0"),
    ("sample best-of-n", ["--policy", "p", "--reward", "r", "--kl-samples", "-1"], "--kl-samples: expected an "
                                                                                  "integer >= 0"),
    ("eval no-model", ["--per-kind", "0"], "--per-kind: expected an integer >= 1"),
    ("sample best-of-n", ["--policy", "p", "--reward", "r", "--seed", "-1"], "--seed: expected an integer >= 0"),
    ("eval no-model", ["--jailbroken", "-2"], "--jailbroken: expected an integer >= 0"),
    ("eval no-model", ["--seed", "-1"], "--seed: expected an integer >= 0"),
    # interpretability
    ("interp sae", ["--kinds", "sparse"], "--kinds: expected one of relu, topk, jumprelu, got 'sparse'"),
    ("interp sae", ["--kinds", ","], "--kinds: expected one or more comma-separated names"),
    ("interp sae", ["--hook", "blocks.4.resid_post"], "unknown hook point 'blocks.4.resid_post'; did you mean"),
    ("interp sae", ["--quick", "--hook", "blocks.0.hook_resid_post"], "unknown hook point"),
    ("interp probe", ["--concepts", "honesty"], "--concepts: expected one of request_kind"),
    ("interp patch", ["--relations", "mars"], "--relations: expected one of capital, river, animal, language"),
    ("interp lens", ["--questions", "0"], "--questions: expected an integer >= 1, got 0"),
    ("interp report", ["--model", "no-model"], "no-model: not a model directory"),
    ("interp report", ["--seed", "-1"], "--seed: expected an integer >= 0"),
    ("interp report", ["--device", "tpu"], "--device: expected auto, cpu, cuda, cuda:N or mps"),
    ("interp cache", ["--model", "no-model", "--out", "a.safetensors", "--n", "0"], "--n: expected an integer >= 1"),
    ("interp cache", ["--model", "no-model", "--out", "a.safetensors", "--kinds", "poetry"],
     "--kinds: expected one or more of arithmetic"),
    # the gridworlds
    ("agents run", ["--env", "Pong"], "environment must be one of"),
    ("agents run", ["--env", "BoatRace", "--agent", "a2c"], "--agent: expected one of q-learning, sarsa, ppo, dqn"),
    ("agents run", ["--env", "BoatRace", "--mitigation", "prayer"], "mitigation must be one of"),
    ("agents run", ["--env", "BoatRace", "--episodes", "0"], "--episodes: expected an integer >= 1"),
    ("agents run", ["--env", "BoatRace", "--timesteps", "-5"], "--timesteps: expected an integer >= 1"),
    ("agents run", ["--env", "BoatRace", "--seeds", "0,-1"], "--seeds: expected one or more distinct integers >= 0"),
    ("agents suite", ["--agent", "a2c"], "--agent: expected one of q-learning, sarsa, ppo, dqn"),
    ("agents suite", ["--env", "Pong"], "environment must be one of"),
    ("agents suite", ["--episodes", "0"], "--episodes: expected an integer >= 1"),
    ("agents suite", ["--seeds", ","], "--seeds: expected one or more distinct integers >= 0"),
    ("agents suite", ["--timesteps", "0"], "--timesteps: expected an integer >= 1"),
    # robustness
    ("robust train", ["--method", "fgsm"], "--method: expected one of standard, pgd, trades"),
    ("robust train", ["--eps", "-0.1"], "--eps: expected a finite number >= 0"),
    ("robust train", ["--epochs", "0"], "--epochs: expected an integer >= 1"),
    ("robust train", ["--arch", "vit"], "--arch: expected one of cnn, mlp, got 'vit'"),
    ("robust train", ["--seed", "-1"], "--seed: expected an integer >= 0"),
    ("robust attack", ["--eps", "0,-0.1"], "--eps: expected one or more finite radii >= 0"),
    ("robust attack", ["--eps", "nan"], "--eps: expected one or more finite radii >= 0"),
    ("robust attack", ["--eps", "a"], "--eps: expected comma-separated numbers"),
    ("robust attack", ["--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    ("robust attack", ["--queries", "0"], "--queries: expected an integer >= 1, got 0"),
    ("robust attack", ["--seed", "-1"], "--seed: expected an integer >= 0"),
    ("robust calibrate", ["--seed", "-1"], "--seed: expected an integer >= 0"),
    ("robust ood", ["--model", "no/such/run"], "not a saved classifier"),
    ("robust shift", ["--seed", "-2"], "--seed: expected an integer >= 0"),
    ("robust report", ["--model", "no/such/run"], "not a saved classifier"),
    # verification
    ("verify train", ["--method", "fgsm"], "--method: expected one of standard, pgd, trades, ibp, crown-ibp, noise"),
    ("verify train", ["--eps", "-1"], "--eps: expected a finite number >= 0"),
    ("verify train", ["--method", "noise", "--sigma", "0"], "--sigma: expected a finite number > 0"),
    ("verify train", ["--epochs", "0"], "--epochs: expected an integer >= 1"),
    ("verify train", ["--hidden", "0"], "--hidden: expected an integer >= 1"),
    ("verify train", ["--method", "ibp", "--seed", "-1"], "--seed: expected an integer >= 0"),
    ("verify bounds", ["--eps", "-0.02"], "--eps: expected a finite number >= 0"),
    ("verify bounds", ["--model", "no/such/run"], "not a saved classifier"),
    ("verify certify", ["--eps", "0,x"], "--eps: expected comma-separated numbers"),
    ("verify certify", ["--eps", "-0.1"], "--eps: expected one or more finite numbers >= 0"),
    ("verify certify", ["--time-limit", "0"], "--time-limit: expected a finite number of seconds > 0"),
    ("verify smooth", ["--sigma", "0"], "--sigma: expected one or more finite noise levels > 0"),
    ("verify smooth", ["--sigma", ""], "--sigma: expected one or more finite numbers >= 0"),
    ("verify smooth", ["--samples", "0"], "--samples: expected an integer >= 1"),
    ("verify certify", ["--seed", "-1"], "--seed: expected an integer >= 0"),
    ("verify report", ["--seed", "-1"], "--seed: expected an integer >= 0"),
    # the studies and the audit
    ("align report", ["--preset", "huge"], "--preset: expected one of default, quick, ideal"),
    ("align report", ["--methods", "dpo,grpo"], "--methods: expected one or more of dpo, rpo, ppo, rloo"),
    ("align report", ["--labeler", "lazy"], "--labeler: expected one of"),
    ("align report", ["--methods", "dpo,dpo"], "--methods: expected one or more of dpo, rpo, ppo, rloo, each once"),
    ("align report", ["--hedging", "1.5"], "--hedging: expected a share in [0, 1]"),
    ("align overopt", ["--samples", "0"], "--samples: expected an integer >= 1"),
    ("align overopt", ["--labelers", "lazy"], "--labelers: expected one or more of ideal, careful, typical"),
    ("align overopt", ["--sft", "no-model"], "--sft: expected a saved model directory"),
    ("align report", ["--eval-per-kind", "0"], "--eval-per-kind: expected an integer >= 1"),
    ("align report", ["--sft", "no/such/model"], "--sft: expected a saved model directory"),
    ("align report", ["--seeds", "0,0"], "--seeds: expected one or more distinct integers >= 0"),
    ("agents report", ["--episodes", "0"], "--episodes: expected an integer >= 1"),
    ("agents report", ["--seeds", "x"], "--seeds: expected comma-separated integers"),
    ("audit", ["--seeds", "1,-2"], "--seeds: expected one or more distinct integers >= 0"),
    ("audit", ["--seed", "-1"], "--seed: expected an integer >= 0"),
    # control
    ("control report", ["--seed", "-1"], "--seed: expected an integer >= 0"),
    ("control report", ["--model", "no-model"], "no-model: not a model directory"),
    ("control report", ["--monitor", "no-monitor"], "--monitor: give the --model it goes with"),
    ("control report", ["--base", "no-base"], "--base: give the --model it goes with"),
    ("control report", ["--device", "tpu"], "--device: expected auto, cpu, cuda, cuda:N or mps"),
    ("control build-guard", ["--fpr-block", "0"], "--fpr-block: expected a rate in (0, 1)"),
    ("control build-guard", ["--fpr-block", "0.2"], "--fpr-block: expected at most fpr_escalate (0.05)"),
    ("control build-guard", ["--model", "no-model"], "no-model: not a model directory"),
    ("control verify-log no-such.db", [], "no-such.db: no such audit log file"),
    ("control verify-log no-such.db", ["--head", "12"], "--head: expected SEQ:HASH"),
    ("control keys add bob", ["--role", "god"], "--role: expected one of user, reviewer, admin, got 'god'"),
    ("control keys add bob", ["--rate", "0"], "--rate: expected a number > 0"),
    ("control keys list", ["--state", "no.db"], "no.db: no such state file"),
    ("control keys revoke bob", ["--state", "no.db"], "no.db: no such state file"),
    ("control export-reviews", ["--out", "r.jsonl", "--state", "no.db"], "no.db: no such state file"),
    ("control retrain", ["--guard", "no.yaml", "--reviews", "r.jsonl"], "--guard: no.yaml: no such file"),
    ("serve", ["--guard", "no.yaml"], "give --model DIR, or --echo for a no-op model"),
    ("serve", ["--guard", "no.yaml", "--echo"], "no.yaml: no such config file"),
    ("serve", ["--guard", "no.yaml", "--echo", "--port", "0"], "--port: expected 1 to 65535"),
    ("serve", ["--guard", "no.yaml", "--echo", "--escalation", "maybe"], "--escalation: expected one of hold, pass"),
    ("serve", ["--guard", "no.yaml", "--echo", "--max-body-bytes", "0"], "--max-body-bytes: expected an integer >= 1"),
    ("evals run", [], "give --model DIR or --endpoint URL (one of them)"),
    ("evals run", ["--model", "no-model"], "--model: no-model is not a model directory"),
    ("evals run", ["--endpoint", "ftp://host/v1"], "--endpoint: expected a URL starting with http://"),
    ("evals run", ["--model", "m", "--max-tokens", "0"], "--max-tokens: expected an integer >= 1, got 0"),
    ("evals run", ["--model", "m", "--temperature", "-1"], "--temperature: expected a number >= 0"),
    ("evals run", ["--model", "m", "--per-kind", "0"], "--per-kind: expected an integer >= 1, got 0"),
    ("evals run", ["--model", "m", "--concurrency", "0"], "--concurrency: expected an integer >= 1, got 0"),
    ("evals run", ["--endpoint", "http://127.0.0.1:9/v1", "--dataset", "no.jsonl"], "no.jsonl: no such file"),
    ("evals run", ["--endpoint", "http://127.0.0.1:9/v1", "--judge", "no-judge"], "no-judge: not a text classifier"),
    ("evals run", ["--model", "m", "--suite", "trivia"], "--suite: expected one of safety, capabilities"),
    ("evals redteam", [], "give --model DIR or --endpoint URL (one of them)"),
    ("evals redteam", ["--model", "m", "--n", "0"], "--n: expected an integer >= 1, got 0"),
    ("evals redteam", ["--model", "m", "--attacks", "none,pleading"], "--attacks: expected some of none"),
    ("evals redteam", ["--model", "no-model"], "--model: no-model is not a model directory"),
    ("evals report", ["--seed", "-1"], "--seed: expected an integer >= 0, got -1"),
    ("evals report", ["--device", "tpu"], "--device: expected auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    ("evals report", ["--base", "b"], "--base: give the --model it goes with"),
    ("evals report", ["--model", "no-model"], "--model: no-model does not exist"),
    ("evals report", ["--model", "m", "--seeds", "0,1"], "--model, --base, --guard or --judge with --seeds"),
    # values of the wrong type, caught by the command line itself
    ("train dpo", [*MODEL, "--steps", "abc"], "Invalid value for '--steps'"),
    ("world sample", ["--bogus", "1"], "No such option: --bogus"),
]


@pytest.mark.parametrize(("command", "args", "message"), TABLE,
                         ids=[f"{c} {' '.join(a)}" for c, a, _ in TABLE])
def test_a_bad_value_is_one_line_exit_2_and_no_file(monkeypatch, capsys, tmp_path, command, args, message):
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "run")] if _writes_a_run(command) else []
    code, stdout, err = run_main(monkeypatch, capsys, *command.split(), *args, *out)
    assert code == 2, err
    assert err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert stdout == ""
    assert list(tmp_path.iterdir()) == [], "a file was written before the values were checked"


def _writes_a_run(command: str) -> bool:
    return not command.startswith(("world", "eval", "serve", "control keys", "control verify-log",
                                   "control export-reviews", "control retrain"))


def test_debug_shows_the_traceback(monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "--debug", "world", "sample", "--n", "0")
    assert code == 2 and "Traceback (most recent call last)" in err and err.strip().endswith(
        "error: --n: expected an integer >= 1, got 0")
