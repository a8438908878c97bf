"""Run the real ASL definition locally: moto's Step Functions interpreter, Lambda tasks in-process.

The definition file is the one CDK deploys; `${...}` substitutions are filled the same way
(function ARNs of functions created in the mock, plus named values). Each Lambda task is
routed to the handler function itself, called with the event and a small context, so the
same handler code runs here as on AWS. A handler's exception becomes a Lambda function
error, so Retry and Catch behave as on AWS. Wait states really wait: shorten them through
the execution input (the definition reads its wait times from the input), never by editing
the definition.

Lambda's limits are kept as AWS keeps them, so that a run here proves what a run there would do:
a handler that runs longer than its function's timeout (`stacks.registry`) returns the error a
timed-out function gives (`Sandbox.Timedout`; its work here ran to the end, on AWS it would have
been cut off anywhere), a result Lambda's Python runtime could not serialize (a datetime, say) fails
as `Runtime.MarshalError`, and a result larger than a state's 256 KiB fails the execution, past any
Catch, as `States.DataLimitExceeded` does on AWS (moto reports it as States.Runtime, the cause
naming the limit). Every invocation's duration and result size is recorded
(`ExecutionResult.invocations`), with the limits it broke.
"""

from __future__ import annotations

import contextlib
import decimal
import io
import json
import logging
import os
import re
import threading
import time
import traceback
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Handler = Callable[[dict[str, Any], Any], Any]
REGION = "us-east-1"
# Step Functions' quota on a state's input and output (and so on a task's result): 256 KiB of UTF-8.
STATE_PAYLOAD_LIMIT_BYTES = 256 * 1024
TIMED_OUT = "Sandbox.Timedout"  # the errorType Lambda's runtimes report for a function that timed out
DATA_LIMIT = "States.DataLimitExceeded"
MARSHAL_ERROR = "Runtime.MarshalError"  # a result Lambda's Python runtime cannot turn into JSON


def _lambda_json(value: Any) -> Any:
    """What Lambda's Python runtime serializes beyond plain JSON: Decimal (as a number). Anything else fails."""
    if isinstance(value, decimal.Decimal):
        return float(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


class StateMachineError(RuntimeError):
    pass


@dataclass(frozen=True)
class LambdaContext:
    """What handlers read from the Lambda context (Powertools logs these fields)."""

    function_name: str
    aws_request_id: str
    memory_limit_in_mb: int = 1024
    invoked_function_arn: str = ""
    deadline: float | None = None  # time.monotonic() at which the function's timeout runs out

    def get_remaining_time_in_millis(self) -> int:
        if self.deadline is None:
            return 900_000
        return max(0, int((self.deadline - time.monotonic()) * 1000))


@dataclass(frozen=True)
class Invocation:
    """One Lambda invocation of an execution: how long it ran and how large its result was, against the limits."""

    function: str
    seconds: float
    timeout_seconds: float | None
    result_bytes: int
    error: str | None = None  # the function error it returned (a handler's exception, or a broken limit)

    @property
    def limit_broken(self) -> str | None:
        """What AWS would have done differently: the function timed out, or its result was too large for a state."""
        if self.timeout_seconds is not None and self.seconds > self.timeout_seconds:
            return f"{self.function} ran {self.seconds:.1f}s, longer than its timeout of {self.timeout_seconds:.0f}s"
        if self.result_bytes > STATE_PAYLOAD_LIMIT_BYTES:
            return (
                f"{self.function} returned {self.result_bytes:,} bytes, more than a state's"
                f" {STATE_PAYLOAD_LIMIT_BYTES:,}"
            )
        return None


@dataclass
class ExecutionResult:
    status: str  # SUCCEEDED / FAILED / TIMED_OUT / ABORTED
    output: dict[str, Any] | None
    error: str | None
    cause: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    invocations: list[Invocation] = field(default_factory=list)
    # Executions of the machine that something else started while this one ran (the alarm rule's rollback),
    # each followed to its end; their Lambda runs are in `invocations` (one list for the whole run)
    followed: list[ExecutionResult] = field(default_factory=list)

    @property
    def last(self) -> ExecutionResult:
        """The execution that ended last: this one, or the last one it was followed by."""
        return self.followed[-1] if self.followed else self

    @property
    def limits_broken(self) -> list[str]:
        return [broken for i in self.invocations if (broken := i.limit_broken) is not None]


def placeholders(definition: str) -> list[str]:
    return sorted(set(_PLACEHOLDER.findall(definition)))


def _function_error(error_type: str, message: str, trace: list[str] | None = None) -> bytes:
    body: dict[str, Any] = {"errorType": error_type, "errorMessage": message}
    if trace is not None:
        body["stackTrace"] = trace
    return json.dumps(body).encode()


@contextlib.contextmanager
def _routed_lambdas(
    handlers: Mapping[str, Handler], timeouts: Mapping[str, float], invocations: list[Invocation]
) -> Iterator[None]:
    """Route moto's Lambda invocations to in-process handlers (restored on exit), keeping Lambda's
    limits (see the module docstring) and recording each invocation in `invocations`."""
    from moto.awslambda_simple.models import LambdaSimpleBackend

    original = LambdaSimpleBackend.invoke
    counter = iter(range(1, 10**9))
    lock = threading.Lock()

    def invoke(self: Any, function_name: str, qualifier: Any, body: Any, headers: Any, response_headers: Any) -> bytes:
        name = function_name.split(":")[-1]
        with lock:
            request = f"local-{next(counter)}"
        handler = handlers.get(name)
        if handler is None:
            response_headers["x-amz-function-error"] = "Unhandled"
            return _function_error("ResourceNotFound", f"no handler for {name}")
        event = json.loads(body) if body else {}
        timeout = timeouts.get(name)
        started = time.monotonic()
        context = LambdaContext(name, request, deadline=started + timeout if timeout is not None else None)
        error: str | None = None
        try:
            result = handler(event, context)
        except Exception as exc:  # a Lambda function error, as AWS reports it
            error = type(exc).__name__
            response = _function_error(error, str(exc), traceback.format_exception(exc)[-3:])
        else:
            try:
                response = json.dumps(result, default=_lambda_json).encode()
            except (TypeError, ValueError) as exc:  # as Lambda's Python runtime answers an unserializable result
                error = MARSHAL_ERROR
                response = _function_error(MARSHAL_ERROR, f"Unable to marshal response: {exc}")
        seconds = time.monotonic() - started
        result_bytes = 0 if error else len(response)
        if timeout is not None and seconds > timeout:
            # Lambda would have stopped it at `timeout`: whatever it returned never reaches the state machine.
            error = TIMED_OUT
            response = _function_error(
                TIMED_OUT, f"RequestId: {request} Error: Task timed out after {timeout:.2f} seconds"
            )
        elif error is None and len(response) > STATE_PAYLOAD_LIMIT_BYTES:
            error = DATA_LIMIT
            response = _function_error(
                DATA_LIMIT,
                f"the result of {name} has {len(response):,} bytes: over the {STATE_PAYLOAD_LIMIT_BYTES:,} a state may hold",
            )
        with lock:
            invocations.append(Invocation(name, seconds, timeout, result_bytes, error))
        if error is not None:
            response_headers["x-amz-function-error"] = "Unhandled"
        return response

    LambdaSimpleBackend.invoke = invoke  # type: ignore[method-assign]
    try:
        yield
    finally:
        LambdaSimpleBackend.invoke = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class LocalStateMachine:
    """One state machine definition, ready to execute locally."""

    def __init__(
        self,
        definition_path: Path,
        handlers: Mapping[str, Handler],
        *,
        values: Mapping[str, str] | None = None,
        parameters: Mapping[str, str] | None = None,
        buckets: Sequence[str] = (),
        environment: Mapping[str, str] | None = None,
        timeouts: Mapping[str, float] | None = None,
    ) -> None:
        """`handlers` maps a substitution name (e.g. 'PreflightFunctionArn') to its handler, and
        `timeouts` (by the same names) to its function's timeout in seconds (none: no limit);
        `values` fills other substitutions; `parameters` are SSM parameters and `buckets` S3 buckets
        to create first; `environment` is the functions' environment (set while the execution runs)."""
        self.definition = definition_path.read_text()
        self.handlers = dict(handlers)
        self.values = dict(values or {})
        self.parameters = dict(parameters or {})
        self.buckets = list(buckets)
        self.environment = dict(environment or {})
        self.timeouts = dict(timeouts or {})
        self.arn: str | None = None  # the machine's ARN in the mock, while an execution runs
        missing = [p for p in placeholders(self.definition) if p not in self.handlers and p not in self.values]
        if missing:
            raise StateMachineError(f"{definition_path.name} needs substitutions with no value: {', '.join(missing)}")

    def run(
        self,
        execution_input: dict[str, Any],
        *,
        timeout: float = 3600,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_start: Callable[[], None] | None = None,
        on_end: Callable[[], None] | None = None,
        poll_interval: float = 0.2,
    ) -> ExecutionResult:
        """Execute once; `on_start` runs inside the mock before the execution starts (to create
        the alarms a health gate reads, say), `on_event` gets each history event as it appears,
        `on_end` runs once it ended (to wait for whatever may start another execution). Executions
        started meanwhile by anything else (`self.arn` is the machine's) are then followed to their end."""
        import boto3
        from moto import mock_aws

        # The interpreter logs each error a state raises, caught or not, with the whole definition's repr:
        # the history (and so `on_event` and the result) has them, told once and readably.
        logging.getLogger("moto.stepfunctions.parser.asl.component.eval_component").setLevel(logging.CRITICAL)
        # As in Lambda: the region is in the environment (handlers build their clients from it).
        os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
        os.environ.setdefault("AWS_REGION", REGION)
        config = {"stepfunctions": {"execute_state_machine": True}, "lambda": {"use_docker": False}}
        function_names = {sub: re.sub(r"FunctionArn$", "", sub) or sub for sub in self.handlers}
        routed = {function_names[sub]: h for sub, h in self.handlers.items()}
        timeouts = {function_names[sub]: t for sub, t in self.timeouts.items() if sub in function_names}
        invocations: list[Invocation] = []
        with (
            mock_aws(config=config),  # type: ignore[call-overload]
            _routed_lambdas(routed, timeouts, invocations),
            _environment(self.environment),
        ):
            iam = boto3.client("iam", region_name=REGION)
            role = iam.create_role(RoleName="zdm-local", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
            lam = boto3.client("lambda", region_name=REGION)
            package = io.BytesIO()
            with zipfile.ZipFile(package, "w") as archive:
                archive.writestr("handler.py", "# routed in-process by rehearsal.stepfunctions\n")
            arns: dict[str, str] = {}
            for sub, name in function_names.items():
                arns[sub] = lam.create_function(
                    FunctionName=name,
                    Runtime="python3.12",
                    Role=role,
                    Handler="handler.handler",
                    Code={"ZipFile": package.getvalue()},
                )["FunctionArn"]
            ssm = boto3.client("ssm", region_name=REGION)
            for name, value in self.parameters.items():
                ssm.put_parameter(Name=name, Value=value, Type="String", Overwrite=True)
            s3 = boto3.client("s3", region_name=REGION)
            for bucket in self.buckets:
                s3.create_bucket(Bucket=bucket)
            filled = _PLACEHOLDER.sub(lambda m: arns.get(m.group(1)) or self.values[m.group(1)], self.definition)
            if on_start is not None:
                on_start()
            sfn = boto3.client("stepfunctions", region_name=REGION)
            machine = sfn.create_state_machine(name="zdm-local", definition=filled, roleArn=role)["stateMachineArn"]
            self.arn = machine
            started = time.monotonic()
            # Named, as AWS names an execution started without one (moto leaves $$.Execution.Name null)
            execution = sfn.start_execution(
                stateMachineArn=machine, name=str(uuid.uuid4()), input=json.dumps(execution_input)
            )["executionArn"]
            follow = _Follow(sfn, on_event, started + timeout, timeout, poll_interval)
            result = follow.to_end(execution, invocations)
            if on_end is not None:
                on_end()
            for other in sfn.list_executions(stateMachineArn=machine)["executions"][::-1]:  # oldest first
                if other["executionArn"] != execution:
                    result.followed.append(follow.to_end(other["executionArn"], invocations))
            return result


@dataclass
class _Follow:
    """Polls an execution to its end, handing each new history event to `on_event`."""

    sfn: Any
    on_event: Callable[[dict[str, Any]], None] | None
    deadline: float  # time.monotonic()
    timeout: float  # the run's, which set the deadline
    poll_interval: float

    def to_end(self, execution: str, invocations: list[Invocation]) -> ExecutionResult:
        started = time.monotonic()
        seen = 0
        history: list[dict[str, Any]] = []
        while True:
            description = self.sfn.describe_execution(executionArn=execution)
            events = _history(self.sfn, execution)
            for event in events[seen:]:
                history.append(event)
                if self.on_event is not None:
                    self.on_event(event)
            seen = len(events)
            if description["status"] != "RUNNING":
                break
            if time.monotonic() > self.deadline:
                cause = f"local run exceeded {self.timeout:g}s"
                self.sfn.stop_execution(executionArn=execution, error="Timeout", cause=cause)
                raise StateMachineError(f"execution did not finish within {self.timeout:g}s")
            time.sleep(self.poll_interval)
        output = description.get("output")
        return ExecutionResult(
            status=description["status"],
            output=json.loads(output) if output else None,
            error=description.get("error"),
            cause=description.get("cause"),
            history=history,
            seconds=time.monotonic() - started,
            invocations=invocations,
        )


def _history(sfn: Any, execution: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"executionArn": execution, "maxResults": 1000}
        if token:
            kwargs["nextToken"] = token
        page = sfn.get_execution_history(**kwargs)
        events += page["events"]
        token = page.get("nextToken")
        if not token:
            return events
