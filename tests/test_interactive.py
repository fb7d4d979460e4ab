"""example_chat_completion.py --interactive on 2 ranks (torchrun, CPU): rank 0 reads the user's
turns, every rank answers in lockstep, the answer streams out; /reset, /exit and Ctrl-D."""

import re
import subprocess

import pexpect
import pytest

from llama import Llama

from .launch import REPO, assert_nothing_left, example_args, tagged_env, torchrun

SYSTEM = "be brief"
MAX_SEQ_LEN, MAX_GEN_LEN = 64, 8
RUN_LIMIT = 300  # seconds: catches a hang, yet leaves a busy 2-core machine time to start the ranks


def chat_command(ckpt, *extra):
    return torchrun("example_chat_completion.py", *example_args(
        ckpt, "--interactive", "--system", SYSTEM, "--temperature", "0", "--max_seq_len", str(MAX_SEQ_LEN),
        "--max_gen_len", str(MAX_GEN_LEN), "--timeout", "20", *extra))


@pytest.fixture(scope="module")
def reference(llama31_ckpts) -> Llama:
    """The same model on one rank, in this process: what the answers should be."""
    ckpt = llama31_ckpts[1]
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=MAX_SEQ_LEN, max_batch_size=1)


def expected_answers(reference: Llama, turns):
    """Greedy answers to each turn, the history trimmed as the example promises: oldest
    exchanges dropped (system message kept) until the prompt leaves MAX_GEN_LEN tokens free."""
    system = [{"role": "system", "content": SYSTEM}]
    history, answers, trimmed = [], [], 0
    for turn in turns:
        if turn == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": turn})
        while len(reference.formatter.encode_dialog_prompt(system + history)) > MAX_SEQ_LEN - MAX_GEN_LEN:
            history, trimmed = history[2:], trimmed + 1
        answer = reference.chat_completion([system + history], temperature=0, max_gen_len=MAX_GEN_LEN)[0]
        answers.append(answer["generation"]["content"])
        history.append(answer["generation"])
    return answers, trimmed


def test_chat_through_a_pipe_keeps_history_trims_it_and_resets(llama31_ckpts, reference):
    """With the compiled decode step, --interactive's default, which must answer as the eager path."""
    turns = ["hello there", "tell me about the sea", "and the mountains?", "and the sky?", "/reset", "hi again"]
    env = tagged_env()
    proc = subprocess.run(chat_command(llama31_ckpts[2]), input=("\n".join(turns) + "\n").encode(), cwd=REPO,
                          env=env, capture_output=True, timeout=RUN_LIMIT)
    stdout = proc.stdout.decode()  # bytes: text mode would turn a generated "\r" into "\n"
    assert proc.returncode == 0, stdout[-3000:] + proc.stderr.decode()[-3000:]  # end of input = Ctrl-D
    assert "compiled decode step" in stdout  # the "Loaded" line
    answers, trimmed = expected_answers(reference, turns)
    assert trimmed > 0, "the turns should overflow max_seq_len, to check the trimming"
    shown = re.findall(r"Assistant: (.*?)\n\nUser: ", stdout, flags=re.S)
    assert shown == answers
    assert stdout.count("oldest exchange") == trimmed  # the visible notice
    assert "[conversation cleared]" in stdout
    assert_nothing_left(env)


def test_exit_command_ends_every_rank(llama31_ckpts):
    env = tagged_env()
    proc = subprocess.run(chat_command(llama31_ckpts[2], "--nocompile"), input="hello\n/exit\nnot read\n", cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=RUN_LIMIT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("Assistant: ") == 1
    assert_nothing_left(env)


def test_chat_in_a_terminal_ends_on_ctrl_d(llama31_ckpts):
    """A pseudo-terminal, as a user at a keyboard: streamed answer, /reset, then Ctrl-D."""
    env = tagged_env()
    command = chat_command(llama31_ckpts[2], "--nocompile")
    child = pexpect.spawn(command[0], command[1:], cwd=str(REPO), env=env, encoding="utf-8", timeout=RUN_LIMIT)
    try:
        child.expect_exact("User: ")
        child.sendline("hello there")
        child.expect_exact("Assistant: ")
        child.expect_exact("User: ")
        child.sendline("/reset")
        child.expect_exact("[conversation cleared]")
        child.expect_exact("User: ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    assert_nothing_left(env)
