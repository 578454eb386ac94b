"""The rating dialplan is valid Asterisk 20+ dialplan and hands the call to the gateway.

`dialplans/hcp-rating.conf` cannot be loaded into a real Asterisk in the test suite, so a small
parser below reads it the way `pbx_config` does (contexts, `exten =>` / `same =>` lines,
`#include`, `;` comments) and refuses what Asterisk would refuse or silently mishandle:
priorities that do not start at 1, a label used twice in an extension, unbalanced `(`, `${`
or `$[`, an application or function that Asterisk 20 and later do not have, and a `Goto`,
`GotoIf` or `Gosub` to a place that does not exist. The tests then check the hand-off itself
(SPEC R2.1): which contexts exist and what they pass to the gateway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import pytest

DIALPLAN = Path(__file__).resolve().parents[1] / "dialplans" / "hcp-rating.conf"


def _names(text: str, *, lower: bool = False) -> frozenset[str]:
    return frozenset(name.lower() if lower else name for name in text.split())


# Applications present in Asterisk 20 and still present in 21 and later (names are
# case-insensitive in Asterisk). Not exhaustive: add one when the dialplan needs it, after
# checking `core show application <Name>` on Asterisk 20 and 21.
KNOWN_APPLICATIONS = _names(
    """
    AddQueueMember AGI AlarmReceiver AMD Answer AttendedTransfer Authenticate BackGround
    BackgroundDetect BlindTransfer Bridge BridgeAdd BridgeWait Busy CELGenUserEvent ChanIsAvail
    ChannelRedirect ChanSpy ConfBridge ConfKick Congestion ContinueWhile ControlPlayback
    DateTime DBdeltree Dial Dictate Directory DISA DumpChan EAGI Echo EndWhile Exec ExecIf
    ExecIfTime ExitWhile ExtenSpy ExternalIVR Festival FollowMe ForkCDR Gosub GosubIf Goto
    GotoIf GotoIfTime Hangup HangupCauseClear ImportVar Incomplete Log MessageSend Milliwatt
    MixMonitor Morsecode MSet MusicOnHold NoCDR NoOp Originate Page Park ParkAndAnnounce
    ParkedCall PauseQueueMember Pickup PickupChan Playback PlayTones PrivacyManager Proceeding
    Progress Queue QueueLog QueueUpdate RaiseException Read ReadExten ReceiveFAX Record
    RemoveQueueMember ResetCDR RetryDial Return Ringing SayAlpha SayAlphaCase SayDigits
    SayNumber SayOrdinal SayPhonetic SayUnixTime SendDTMF SendFAX SendImage SendText SendURL
    Set SetAMAFlags SoftHangup StackPop StartMusicOnHold Stasis StopMixMonitor StopMusicOnHold
    StopPlayTones System Transfer TryExec TrySystem UnpauseQueueMember UserEvent Verbose
    VMAuthenticate VMSayName VoiceMail VoiceMailMain Wait WaitDigit WaitExten WaitForNoise
    WaitForRing WaitForSilence WaitUntil While Zapateller
    """,
    lower=True,
)

# Applications that existed once but are gone in Asterisk 21: a dialplan for "20 and later"
# must not use them, and the reason says what to use instead.
REMOVED_APPLICATIONS = {
    "macro": "was removed in Asterisk 21; use Gosub and Return",
    "monitor": "was removed in Asterisk 21 (app_monitor); use MixMonitor",
    "stopmonitor": "was removed in Asterisk 21 (app_monitor); use StopMixMonitor",
    "changemonitor": "was removed in Asterisk 21 (app_monitor); use MixMonitor",
    "pausemonitor": "was removed in Asterisk 21 (app_monitor); use MixMonitor",
    "unpausemonitor": "was removed in Asterisk 21 (app_monitor); use MixMonitor",
    "sipaddheader": "was removed with chan_sip in Asterisk 21; use Set(PJSIP_HEADER(add,...))",
    "deadagi": "is deprecated (still documented in 20 and 22); use AGI, which runs on hung-up channels itself",
}

# Dialplan functions of Asterisk 20 and later (`core show function <NAME>`). Not exhaustive.
KNOWN_FUNCTIONS = _names(
    """
    AES_DECRYPT AES_ENCRYPT ARRAY AST_CONFIG BASE64_DECODE BASE64_ENCODE CALLERID CALLERPRES
    CDR CDR_PROP CHANNEL CHANNELS CONNECTEDLINE CSV_QUOTE CURL CUT DB DB_DELETE DB_EXISTS
    DB_KEYS DEC DEVICE_STATE DIALGROUP DIALPLAN_EXISTS ENUMLOOKUP ENV EVAL EXCEPTION EXISTS
    EXTENSION_STATE FIELDNUM FIELDQTY FILE FILTER GLOBAL GROUP GROUP_COUNT GROUP_LIST
    GROUP_MATCH_COUNT HANGUPCAUSE HANGUPCAUSE_KEYS HASH HASHKEYS HINT IF IFMODULE IFTIME IMPORT
    INC ISNULL JITTERBUFFER KEYPADHASH LEN LISTFILTER LOCAL LOCAL_PEEK LOCK MASTER_CHANNEL MATH
    MD5 MESSAGE MESSAGE_DATA ODBC PASSTHRU PJSIP_AOR PJSIP_CONTACT PJSIP_DIAL_CONTACTS
    PJSIP_ENDPOINT PJSIP_HEADER PJSIP_MEDIA_OFFER PJSIP_PARSE_URI POP PRESENCE_STATE PUSH
    QUEUE_EXISTS QUEUE_GET_CHANNEL QUEUE_MEMBER QUEUE_MEMBER_LIST QUEUE_MEMBER_PENALTY
    QUEUE_VARIABLES QUEUE_WAITING_COUNT QUOTE RAND REALTIME REALTIME_DESTROY REALTIME_FIELD
    REALTIME_HASH REALTIME_STORE REDIRECTING REGEX REPLACE SET SHA1 SHARED SHELL SHIFT SORT
    SPRINTF SQL_ESC STACK_PEEK STAT STRFTIME STRPTIME STRREPLACE SYSINFO TALK_DETECT TESTTIME
    TIMEOUT TOLOWER TOUPPER TRYLOCK UNLOCK UNSHIFT URIDECODE URIENCODE VALID_EXTEN VERSION
    VM_INFO VOLUME
    """
)

# Applications whose arguments hold other applications: ExecIf(expr?App(args)[:App(args)]).
_WRAPPING_APPLICATIONS = {"execif", "exec", "tryexec"}
_JUMPING_APPLICATIONS = {"goto", "gotoif", "gosub", "gosubif"}
_CLOSER = {"(": ")", "${": "}", "$[": "]", "[": "]", "{": "}"}


class DialplanError(ValueError):
    """What is wrong with a dialplan, one problem per line, each with its line number."""


@dataclass(frozen=True)
class Step:
    """One priority of an extension: `exten => s,n(label),App(args)`."""

    context: str
    extension: str
    priority: int
    label: str | None
    app: str
    args: str
    line: int


@dataclass
class Dialplan:
    contexts: dict[str, dict[str, list[Step]]] = field(default_factory=dict)
    includes: list[str] = field(default_factory=list)

    def steps(self, context: str, extension: str) -> list[Step]:
        return self.contexts[context][extension]


def parse_dialplan(text: str) -> Dialplan:
    """Read extensions.conf syntax; raise DialplanError listing every problem found."""
    plan = Dialplan()
    problems: list[str] = []
    context: str | None = None
    extension: str | None = None

    for number, raw in enumerate(_without_comments(text).splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            directive, _, argument = line.partition(" ")
            if directive in ("#include", "#tryinclude") and argument.strip():
                plan.includes.append(argument.strip().strip('"<>'))
            elif directive != "#exec":
                problems.append(f"line {number}: unknown directive {directive!r}.")
            continue
        header = re.fullmatch(r"\[([^\[\]\s]+)\](\([^)]*\))?", line)
        if header:
            context, extension = header.group(1), None
            plan.contexts.setdefault(context, {})
            continue
        if context is None:
            problems.append(f"line {number}: {line!r} is outside any [context].")
            continue
        key, arrow, value = (part.strip() for part in line.partition("="))
        value = value.removeprefix(">").strip()
        if not arrow:
            problems.append(f"line {number}: {line!r} is neither a context nor a 'key => value'.")
            continue
        if context in ("globals", "general") or key.lower() in (
            "include",
            "ignorepat",
            "switch",
            "eswitch",
            "lswitch",
        ):
            problems += _balance_problems(value, number)
            continue
        if key.lower() == "exten":
            name, _, rest = value.partition(",")
            extension = name.strip()
        elif key.lower() == "same":
            rest = value
            if extension is None:
                problems.append(f"line {number}: 'same =>' has no 'exten =>' before it in {context}.")
                continue
        else:
            problems.append(f"line {number}: unknown keyword {key!r} in [{context}].")
            continue
        problems += _add_step(plan, context, extension, rest, number)

    problems += _jump_problems(plan)
    if problems:
        raise DialplanError("\n".join(problems))
    return plan


def _without_comments(text: str) -> str:
    """Drop `;--  --;` blocks (keeping line numbers) and `;` comments, but not `\\;`."""
    text = re.sub(r";--.*?--;", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    return "\n".join(re.sub(r"(?<!\\);.*", "", line) for line in text.splitlines())


def _add_step(plan: Dialplan, context: str, extension: str, rest: str, number: int) -> list[str]:
    where = f"line {number} ({context},{extension})"
    priority_text, _, application = rest.partition(",")
    match = re.fullmatch(r"\s*(\d+|n|hint)\s*(?:\(([A-Za-z0-9_-]+)\))?\s*", priority_text)
    if not match:
        return [f"{where}: priority {priority_text.strip()!r} is not a number, 'n' or 'hint'."]
    if match.group(1) == "hint":
        return []
    steps = plan.contexts[context].setdefault(extension, [])
    expected = len(steps) + 1
    if match.group(1) == "n":
        if not steps:
            return [f"{where}: the first priority of an extension must be 1, not 'n'."]
        priority = expected
    else:
        priority = int(match.group(1))
        if priority != expected:
            return [f"{where}: priority {priority} should be {expected} (1 first, then 'n')."]
    label = match.group(2)
    if label and any(step.label == label for step in steps):
        return [f"{where}: label {label!r} is used twice in the same extension."]
    problems = _balance_problems(application, number)
    if problems:
        return problems
    name, args, problems = _application(application.strip(), where)
    steps.append(Step(context, extension, priority, label, name, args, number))
    return problems


def _application(call: str, where: str) -> tuple[str, str, list[str]]:
    """Split `App(args)` (or a bare `App`), checking the app, its functions and nested apps."""
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:\((.*)\))?", call, flags=re.S)
    if not match:
        return call, "", [f"{where}: {call!r} is not an application call App(arguments)."]
    name, args = match.group(1), match.group(2) or ""
    problems = []
    if name.lower() in REMOVED_APPLICATIONS:
        problems.append(f"{where}: application {name} {REMOVED_APPLICATIONS[name.lower()]}.")
    elif name.lower() not in KNOWN_APPLICATIONS:
        problems.append(f"{where}: {name} is not an Asterisk 20+ dialplan application.")
    problems += [
        f"{where}: {function}() is not an Asterisk dialplan function."
        for function in functions_used(args)
        if function not in KNOWN_FUNCTIONS
    ]
    if name.lower() in _WRAPPING_APPLICATIONS:
        for inner in wrapped_applications(name, args):
            problems += _application(inner, where)[2]
    return name, args, problems


def _balance_problems(text: str, number: int) -> list[str]:
    """`(`, `${`, `$[` (and plain brackets) must close in order; `\\x` escapes one character."""
    stack: list[str] = []
    index = 0
    while index < len(text):
        pair = text[index : index + 2]
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if pair in ("${", "$["):
            stack.append(_CLOSER[pair])
            index += 2
            continue
        if char in "([{":
            stack.append(_CLOSER[char])
        elif char in ")]}":
            if not stack:
                return [f"line {number}: {char!r} at column {index + 1} closes nothing open."]
            expected = stack.pop()
            if expected != char:
                return [f"line {number}: {char!r} at column {index + 1} where {expected!r} was due."]
        index += 1
    if stack:
        return [f"line {number}: {len(stack)} bracket(s) left open; expected {''.join(stack[::-1])!r}."]
    return []


def split_top_level(text: str, separator: str) -> list[str]:
    """Split on `separator` outside any (), ${}, $[] and double quotes, as Asterisk does."""
    parts, depth, quoted, start = [], 0, False, 0
    for index, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return parts


def wrapped_applications(name: str, args: str) -> list[str]:
    """The applications inside ExecIf(expr?A(x)[:B(y)]), Exec(A(x)) or TryExec(A(x))."""
    if name.lower() != "execif":
        return [args]
    _expression, *branches = split_top_level(args, "?")
    if not branches:
        return []
    return [app for app in split_top_level("?".join(branches), ":") if app]


def functions_used(text: str) -> list[str]:
    return re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\(", text)


def variables_used(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)[}:]", text))


def jump_targets(step: Step) -> list[tuple[str, str, str]]:
    """(context, extension, priority or label) of every place a Goto/GotoIf/Gosub can go."""
    if step.app.lower() not in _JUMPING_APPLICATIONS:
        return []
    if step.app.lower() in ("gotoif", "gosubif"):
        _condition, *branches = split_top_level(step.args, "?")
        destinations = split_top_level("?".join(branches), ":")
    else:
        destinations = [step.args]
    targets = []
    for destination in filter(None, (d.strip() for d in destinations)):
        parts = [p.strip() for p in split_top_level(destination, ",")]
        parts[-1] = parts[-1].split("(", 1)[0]  # Gosub(ctx,exten,1(arguments))
        parts = [step.context, step.extension][: 3 - len(parts)] + parts
        targets.append((parts[0], parts[1], parts[2]))
    return targets


def _jump_problems(plan: Dialplan) -> list[str]:
    problems = []
    for extensions in plan.contexts.values():
        for steps in extensions.values():
            for step in steps:
                for context, extension, priority in jump_targets(step):
                    if "$" in context + extension + priority or context not in plan.contexts:
                        continue  # computed, or a context defined elsewhere in extensions.conf
                    target = plan.contexts[context].get(extension)
                    found = target is not None and any(
                        str(s.priority) == priority or s.label == priority for s in target
                    )
                    if not found:
                        problems.append(
                            f"line {step.line}: {step.app} goes to {context},{extension},"
                            f"{priority}, which does not exist."
                        )
    return problems


def executed_steps(plan: Dialplan, context: str, extension: str, depth: int = 0) -> list[Step]:
    """The steps of an extension in order, with Gosub subroutines in this file inlined."""
    result = []
    for step in plan.steps(context, extension):
        result.append(step)
        if step.app.lower() == "gosub" and depth < 5:
            (target_context, target_extension, _), *_ = jump_targets(step)
            if target_context in plan.contexts:
                result += executed_steps(plan, target_context, target_extension, depth + 1)
    return result


def effective_calls(steps: list[Step]) -> list[tuple[str, str]]:
    """(application, arguments) of each step, with ExecIf/Exec unwrapped to what they run."""
    calls = []
    for step in steps:
        calls.append((step.app, step.args))
        if step.app.lower() in _WRAPPING_APPLICATIONS:
            for inner in wrapped_applications(step.app, step.args):
                match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:\((.*)\))?", inner, flags=re.S)
                if match:
                    calls.append((match.group(1), match.group(2) or ""))
    return calls


@pytest.fixture(scope="module")
def plan() -> Dialplan:
    return parse_dialplan(DIALPLAN.read_text(encoding="utf-8"))


def _agi(plan: Dialplan, context: str) -> Step:
    (step,) = [s for s in executed_steps(plan, context, "s") if s.app == "AGI"]
    return step


# --- the parser itself ---------------------------------------------------------------------


def test_a_plain_dialplan_with_include_comments_and_labels_is_read():
    plan = parse_dialplan(
        "#include hcp-rating.conf\n"
        ";-- a block\ncomment --;\n"
        "[demo] ; trailing comment\n"
        "exten => s,1,Answer\n"
        " same => n(again),Playback(hcp/hcp-rating-menu)\n"
        " same => n,GotoIf($[${LEN(${X})} = 0]?again:done)\n"
        " same => n(done),Verbose(1,semicolon\\; kept)\n"
        "exten => s,n,Hangup()\n"
    )

    assert plan.includes == ["hcp-rating.conf"]
    assert [(s.priority, s.label, s.app) for s in plan.steps("demo", "s")] == [
        (1, None, "Answer"),
        (2, "again", "Playback"),
        (3, None, "GotoIf"),
        (4, "done", "Verbose"),
        (5, None, "Hangup"),
    ]


@pytest.mark.parametrize(
    ("snippet", "complaint"),
    [
        pytest.param("exten => s,1,NoOp(open", "left open", id="unbalanced-parenthesis"),
        pytest.param("exten => s,1,NoOp(x))", "closes nothing", id="extra-parenthesis"),
        pytest.param("exten => s,1,NoOp(${UNIQUEID)", "'}' was due", id="unclosed-variable"),
        pytest.param("exten => s,1,Set(A=$[1 + 2)", "']' was due", id="unclosed-expression"),
        pytest.param("exten => s,1,PlayMenu(x)", "not an Asterisk 20+", id="unknown-application"),
        pytest.param("exten => s,1,Macro(rate)", "removed in Asterisk 21", id="macro"),
        pytest.param("exten => s,1,Set(A=${NOSUCH(x)})", "NOSUCH() is not", id="unknown-function"),
        pytest.param("exten => s,1,ExecIf(1?Frobnicate(x))", "Frobnicate is not", id="unknown-app-in-execif"),
        pytest.param("exten => s,n,Answer()", "must be 1", id="starts-with-n"),
        pytest.param("exten => s,2,Answer()", "should be 1", id="starts-with-2"),
        pytest.param("exten => s,1,Answer()\nexten => s,3,Hangup()", "should be 2", id="priority-gap"),
        pytest.param("exten => s,1(a),Answer()\n same => n(a),Hangup()", "used twice", id="duplicate-label"),
        pytest.param("exten => s,1,Goto(nowhere)", "does not exist", id="goto-missing-label"),
        pytest.param("exten => s,1,Goto(demo,t,1)", "does not exist", id="goto-missing-extension"),
        pytest.param("exten => s,x,Answer()", "not a number", id="bad-priority"),
        pytest.param("frobnicate => s,1,Answer()", "unknown keyword", id="unknown-keyword"),
    ],
)
def test_a_broken_snippet_is_refused_with_the_reason(snippet, complaint):
    with pytest.raises(DialplanError, match=re.escape(complaint)):
        parse_dialplan("[demo]\n" + snippet + "\n")


def test_same_without_an_extension_is_refused():
    with pytest.raises(DialplanError, match="has no 'exten =>'"):
        parse_dialplan("[demo]\n same => n,Answer()\n")


# --- the rating dialplan -------------------------------------------------------------------


def test_rating_dialplan_is_valid_for_asterisk_20_and_later(plan):
    assert {"hcp-rating", "hcp-rating-classic", "hcp-hotline-example"} <= set(plan.contexts)
    assert "s" in plan.contexts["hcp-rating"]
    assert "s" in plan.contexts["hcp-rating-classic"]
    assert plan.includes == [], "an include file must not include further files"


def test_dialplan_names_no_application_removed_in_asterisk_21():
    text = _without_comments(DIALPLAN.read_text(encoding="utf-8")).lower()
    assert not [name for name in REMOVED_APPLICATIONS if re.search(rf"\b{name}\(", text)]


def test_fastagi_url_carries_the_call_identifiers(plan):
    """SPEC R2.1: unique id, linked id, agent, work order, matter and queue reach the gateway."""
    url = _agi(plan, "hcp-rating").args

    prefix, _, query = url.partition("?")
    assert prefix == "agi://${HCP_AGI_HOST}:${HCP_AGI_PORT}/rating"
    assert parse_qsl(query, keep_blank_values=True) == [
        ("call_id", "${URIENCODE(${UNIQUEID})}"),
        ("linked_id", "${URIENCODE(${CHANNEL(linkedid)})}"),
        ("agent", "${URIENCODE(${HCP_AGENT_ID})}"),
        ("work_order", "${URIENCODE(${HCP_WORK_ORDER})}"),
        ("matter", "${URIENCODE(${HCP_MATTER_CODE})}"),
        ("queue", "${URIENCODE(${HCP_QUEUE})}"),
    ]
    assert len(split_top_level(url, ",")) == 1, "a comma would split the AGI arguments"


def test_classic_script_gets_the_fastagi_query_as_its_one_argument(plan):
    """Same keys and the same URIENCODE as the FastAGI URL, in one argument after a '?'."""
    script, *arguments = split_top_level(_agi(plan, "hcp-rating-classic").args, ",")
    fastagi_query = _agi(plan, "hcp-rating").args.partition("?")[2]

    assert script == "gateway-agi"
    assert arguments == ["?" + fastagi_query]


@pytest.mark.parametrize("context", ["hcp-rating", "hcp-rating-classic"])
def test_channel_is_prepared_before_the_agi_runs(plan, context):
    steps = executed_steps(plan, context, "s")
    before_agi = effective_calls(steps[: steps.index(_agi(plan, context))])

    assert ("Set", "CHANNEL(language)=zh") in before_agi
    assert ("Set", "HCP_AGI_HOST=127.0.0.1") in before_agi
    assert ("Set", "HCP_AGI_PORT=4573") in before_agi
    assert ("Set", "AGISIGHUP=no") in before_agi, "a key before hang-up must be kept (R2.4)"


@pytest.mark.parametrize("context", ["hcp-rating", "hcp-rating-classic"])
def test_handoff_reads_every_identifier_of_the_call(plan, context):
    text = "\n".join(s.args for s in executed_steps(plan, context, "s"))

    assert {"HCP_AGENT_ID", "HCP_WORK_ORDER", "HCP_MATTER_CODE", "HCP_QUEUE", "UNIQUEID"} <= (variables_used(text))
    assert "${CHANNEL(linkedid)}" in text
    assert "${CALLERID(num)}" in text


def test_no_log_line_contains_the_caller_number(plan):
    """SPEC R5.1: phone numbers never reach a log, including Asterisk's own."""
    logging_calls = [
        args
        for extensions in plan.contexts.values()
        for steps in extensions.values()
        for app, args in effective_calls(steps)
        if app in ("Verbose", "Log", "NoOp")
    ]
    assert len(logging_calls) > 5
    assert not [args for args in logging_calls if "CALLERID" in args or "CONNECTEDLINE" in args]


@pytest.mark.parametrize("context", ["hcp-rating", "hcp-rating-classic"])
def test_outcome_is_logged_after_the_agi_then_the_call_ends(plan, context):
    steps = plan.steps(context, "s")
    after_agi = steps[steps.index(_agi(plan, context)) + 1 :]

    assert any(s.app == "Verbose" and "${AGISTATUS}" in s.args and "${HCP_RATING}" in s.args for s in after_agi)
    assert after_agi[-1].app == "Hangup"


@pytest.mark.parametrize("context", ["hcp-rating", "hcp-rating-classic"])
def test_caller_hanging_up_during_the_rating_is_logged_too(plan, context):
    logged = [args for app, args in effective_calls(plan.steps(context, "h")) if app == "Verbose"]

    assert logged
    assert all("${AGISTATUS}" in args and "${HCP_RATING}" in args for args in logged)


def test_hotline_example_hands_over_when_the_agent_hangs_up(plan):
    """Queue needs 'c' and Dial needs 'g' so the caller, not the agent, goes on to the rating."""
    example = plan.contexts["hcp-hotline-example"]
    calls = [(s.app, s.args, s.extension) for steps in example.values() for s in steps]
    queue_options = [split_top_level(a, ",")[1] for app, a, _ in calls if app == "Queue"]
    dial_options = [split_top_level(a, ",")[2] for app, a, _ in calls if app == "Dial"]

    assert queue_options and all("c" in options for options in queue_options)
    assert dial_options and all("g" in options for options in dial_options)
    for extension in {e for app, _, e in calls if app in ("Queue", "Dial")}:
        targets = [t for s in example[extension] for t in jump_targets(s)]
        assert ("hcp-rating", "s", "1") in targets, extension
    assert not [a for _, a, _ in calls if "F(hcp-rating" in a], "F() moves the agent, not the caller"


def test_hotline_example_sets_inherited_identifiers(plan):
    """Two underscores: the values also reach the Local channels and agent legs created from the caller's."""
    assigned = {
        args.split("=", 1)[0]
        for steps in plan.contexts["hcp-hotline-example"].values()
        for app, args in effective_calls(steps)
        if app == "Set"
    }
    assert {"__HCP_AGENT_ID", "__HCP_WORK_ORDER", "__HCP_QUEUE"} <= assigned
