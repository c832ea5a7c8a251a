"""The state vocabulary of the contract, read from the .proto itself.

Which states are terminal is declared once, as the `(stepstream.common.v1.terminal)`
option on the enum values in states.proto; everything here derives from it.
"""

from __future__ import annotations

from google.protobuf.descriptor import EnumDescriptor

from stepstream.common.v1 import states_pb2


def _terminal_values(enum: EnumDescriptor) -> frozenset[int]:
    return frozenset(
        value.number for value in enum.values if value.GetOptions().Extensions[states_pb2.terminal]
    )


def _words(enum: EnumDescriptor, prefix: str) -> dict[int, str]:
    return {value.number: value.name.removeprefix(prefix).lower() for value in enum.values}


TERMINAL_JOB_STATES = _terminal_values(states_pb2.JobState.DESCRIPTOR)
TERMINAL_STEP_STATES = _terminal_values(states_pb2.StepState.DESCRIPTOR)

# The states a fan-out child takes (never WAITING or SKIPPED, as states.proto says):
# what ListChildren accepts as a filter, and what the CLI offers for `children --state`.
CHILD_STATES = frozenset({
    states_pb2.STEP_STATE_PENDING, states_pb2.STEP_STATE_RUNNING, states_pb2.STEP_STATE_COMPLETED,
    states_pb2.STEP_STATE_FAILED, states_pb2.STEP_STATE_CANCELLED,
})

_JOB_WORDS = _words(states_pb2.JobState.DESCRIPTOR, "JOB_STATE_")
_STEP_WORDS = _words(states_pb2.StepState.DESCRIPTOR, "STEP_STATE_")
_REASON_WORDS = _words(states_pb2.Reason.DESCRIPTOR, "REASON_")


def job_state_word(state: int) -> str:
    """'running', 'completed', ... as shown to people and in JSON output."""
    return _JOB_WORDS.get(state, "unspecified")


def step_state_word(state: int) -> str:
    return _STEP_WORDS.get(state, "unspecified")


def reason_word(reason: int) -> str:
    """'' for the ordinary path, else e.g. 'timeout', 'child_failures'."""
    return "" if reason == states_pb2.REASON_UNSPECIFIED else _REASON_WORDS.get(reason, "unspecified")


def job_state_from_word(word: str) -> int:
    """Inverse of job_state_word; raises ValueError naming the valid words."""
    return _from_word(_JOB_WORDS, states_pb2.JOB_STATE_UNSPECIFIED, "job", word)


def step_state_from_word(word: str) -> int:
    return _from_word(_STEP_WORDS, states_pb2.STEP_STATE_UNSPECIFIED, "step", word)


def _from_word(words: dict[int, str], unspecified: int, kind: str, word: str) -> int:
    valid = {name: number for number, name in words.items() if number != unspecified}
    if word.lower() in valid:
        return valid[word.lower()]
    raise ValueError(f"unknown {kind} state {word!r} (one of: {', '.join(valid)})")
