"""``tether completion bash|zsh|fish``: a completion script generated from the parser itself,
so a new verb or flag completes without anyone editing a script."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

from tether._cli._output import EXIT_OK


@dataclass
class Verb:
    """What completes after one verb: its flags, the choices of those that have them, the
    flags that take a file, and the choices of its positional words."""

    name: str
    help: str = ""
    flags: list[str] = field(default_factory=list)
    choices: dict[str, list[str]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    words: list[str] = field(default_factory=list)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:  # type: ignore[type-arg]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _verb(name: str, parser: argparse.ArgumentParser, help_text: str = "") -> Verb:
    verb = Verb(name, help_text)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            verb.words.extend(action.choices)
        elif not action.option_strings:
            verb.words.extend(str(c) for c in action.choices or ())
        elif action.help != argparse.SUPPRESS:
            verb.flags.extend(action.option_strings)
            for flag in action.option_strings:
                if action.choices:
                    verb.choices[flag] = [str(c) for c in action.choices]
                elif action.metavar in ("FILE", "DIR"):
                    verb.files.append(flag)
    return verb


def verbs_of(parser: argparse.ArgumentParser) -> tuple[Verb, list[Verb]]:
    """The top level (its flags) and every verb, from the parser."""
    sub = _subparsers(parser)
    helps = {a.dest: a.help or "" for a in sub._choices_actions} if sub else {}
    found = [_verb(n, p, helps.get(n, "")) for n, p in (sub.choices.items() if sub else ())]
    return _verb("", parser), found


def _bash_case(verb: Verb) -> str:
    lines = [f"        {verb.name})"]
    for flag, choices in verb.choices.items():
        lines.append(f'            [[ $prev == {flag} ]] && opts="{" ".join(choices)}" && break')
    for flag in verb.files:
        lines.append(f"            [[ $prev == {flag} ]] && files=1 && break")
    lines.append(
        f'            words="{" ".join(verb.words)}" flags="{" ".join(verb.flags)}"; break ;;'
    )
    return "\n".join(lines)


def bash(top: Verb, verbs: list[Verb]) -> str:
    cases = "\n".join(_bash_case(v) for v in verbs)
    names = " ".join(v.name for v in verbs)
    return f"""# tether completion for bash: source <(tether completion bash)
_tether() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}}
    local verb="" opts="" words="" flags="" files=0 word
    for word in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        case " {names} " in *" $word "*) verb=$word; break ;; esac
    done
    while true; do
    case $verb in
{cases}
{_bash_case(replace(top, name="*"))}
    esac
    done
    if (( files )); then COMPREPLY=($(compgen -f -- "$cur")); return; fi
    if [[ -z $opts ]]; then
        if [[ $cur == -* || -z $words ]]; then opts=$flags; else opts=$words; fi
    fi
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}}
complete -F _tether tether
"""


def zsh(top: Verb, verbs: list[Verb]) -> str:
    # zsh runs bash completions through bashcompinit: one generator, two shells.
    return "#compdef tether\n# tether completion for zsh\n" + (
        "autoload -U +X bashcompinit && bashcompinit\n" + bash(top, verbs)
    )


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def fish(top: Verb, verbs: list[Verb]) -> str:
    names = " ".join(v.name for v in verbs)
    out = ["# tether completion for fish: tether completion fish | source", "complete -c tether -f"]
    for v in verbs:
        out.append(
            f"complete -c tether -n 'not __fish_seen_subcommand_from {names}' "
            f"-a {v.name} -d {_fish_quote(v.help)}"
        )
    for v in [top, *verbs]:
        cond = f"__fish_seen_subcommand_from {v.name}" if v.name else "true"
        for word in v.words:
            out.append(f"complete -c tether -n '{cond}' -a {_fish_quote(word)}")
        for flag in v.flags:
            out.append(_fish_flag(cond, flag, v))
    return "\n".join(out) + "\n"


def _fish_flag(cond: str, flag: str, verb: Verb) -> str:
    spec = f"-l {flag[2:]}" if flag.startswith("--") else f"-s {flag[1:]}"
    extra = ""
    if flag in verb.choices:
        extra = f" -x -a {_fish_quote(' '.join(verb.choices[flag]))}"
    elif flag in verb.files:
        extra = " -r -F"
    return f"complete -c tether -n '{cond}' {spec}{extra}"


def completion(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Print the completion script for ``args.shell``."""
    top, verbs = verbs_of(parser)
    print({"bash": bash, "zsh": zsh, "fish": fish}[args.shell](top, verbs), end="")
    return EXIT_OK
