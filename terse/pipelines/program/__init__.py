"""The program DSL: Python functions that build prompts and call the model step by step.

    import terse
    from terse import SamplingParams, assistant, gen, select, system, user

    @terse.program
    def qa(s, question):
        s += system("Answer briefly.")
        s += user(question)
        s += assistant(gen("answer", params=SamplingParams(max_tokens=64), stop="\\n"))

    out = qa.run(question="Where is Acme based?", backend=terse.load_backend("local:path/to/model"))
    out["answer"], out.usage, out.critical_path_s

- `s += system(...) / user(...) / assistant(...)` add chat turns (rendered by `Backend.render_chat`);
  plain strings add raw text (inside the open assistant turn once chat turns exist).
- `gen(name, params=SamplingParams(...))` generates; `gen(name, regex=... | json_schema=... | choices=...)`
  constrains the output; `select(name, choices)` picks by log-probability (`method="constrained"`: one
  generation inside the choices).
- `s.fork(n)` branches share the parent's text; `forks.join()` waits for them.
- `prog.run()`, `prog.run_batch([...], progress=True)`, `prog.submit().stream(name)`, `await prog.arun()`.
"""

from terse.pipelines.program.expr import (
    Gen,
    ProgramError,
    Select,
    Turn,
    VariableError,
    assistant,
    gen,
    select,
    system,
    user,
)
from terse.pipelines.program.program import Program, ProgramRun, fork, program
from terse.pipelines.program.state import Forks, ProgramState

__all__ = [
    "Forks",
    "Gen",
    "Program",
    "ProgramError",
    "ProgramRun",
    "ProgramState",
    "Select",
    "Turn",
    "VariableError",
    "assistant",
    "fork",
    "gen",
    "program",
    "select",
    "system",
    "user",
]
