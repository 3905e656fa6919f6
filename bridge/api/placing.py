"""``POST /v1/calls``: placing an outbound call, and the checks before anything is sent.

Part of ``bridge.api.routes.Api`` (like ``MediaApi``): the toll-fraud guard
(``sip.allowed_destinations``, 403), the trunk's outbound limits (429 over ``cps``,
409 over ``max_calls``), the agent's context, profile and language (400 naming the
field), and the caller ID (``from`` must be one of the trunk's numbers, on a call to
that trunk; ``withhold_caller_id`` needs a number to assert). The engine checks the
destination and the number again (``sip.outbound``).
"""
from __future__ import annotations

from bridge.api.base import ApiError
from bridge.core import callcontext
from bridge.core.states import CallState
from sip.uri import DestinationPolicy, check_destination, trunk_of


class PlacingApi:
    async def create_call(self, request, body):
        trunk = body.get("trunk")
        if trunk is not None and trunk not in {t.name for t in self.services.cfg.trunks}:
            raise ApiError(400, "invalid_field", f"unknown trunk {trunk!r}", "trunk")
        app = body.get("app", "api")
        context, profile, language = self._call_agent(body, app)
        if app == "agent" and self.services.hub is None:
            raise ApiError(409, "no_speech_engines", f"app {app!r} needs the models (models.load)", "app")
        self._check_destination(body["to"], trunk)
        withhold = bool(body.get("withhold_caller_id"))
        caller, asserted = self._check_caller(body.get("from", ""), trunk, body["to"], withhold)
        # the limits of the trunk the call goes through, named or not (a URI at a trunk's address)
        with self.trunk_limits.placing(trunk_of(body["to"], trunk, self._policy())):  # 429 over cps, 409 over max_calls
            try:
                call_id = await self.services.make_call(body["to"], trunk, app, caller, withhold)
            except Exception as exc:  # noqa: BLE001 - engine refusals
                raise ApiError(409 if "full" in str(exc) or "draining" in str(exc) else 400, "call_failed", str(exc))
        s = self.services.calls.get(call_id)       # offered before the engine answered the command
        if s is not None:
            s.set_context(context)
            s.asserted = asserted                  # From says anonymous: keep who the carrier was told
            s.profile, s.language = profile, language
        out = {"id": call_id, "state": CallState.RINGING, "app": app}
        return 201, {**out, "context": context} if context else out

    def _check_caller(self, number: str, trunk: str | None, to: str, withhold: bool) -> tuple[str, str]:
        """POST /v1/calls's ``from``: one of the named trunk's numbers (``caller_id``, ``caller_ids``),
        on a call that goes to that trunk (a URI at another trunk's address would present this
        trunk's number to a carrier that never issued it); a key cannot make the box present any
        number it likes (caller-ID spoofing). ``withhold_caller_id`` needs a number to assert.
        Returns (the number the call presents, "" for the trunk's; the number asserted when withheld)."""
        spec = next((t for t in self.services.cfg.trunks if t.name == trunk), None) if trunk else None
        asserted = (number or (spec.caller_id if spec is not None else "")) if withhold else ""
        if withhold and not asserted:
            raise ApiError(400, "invalid_field", "withhold_caller_id needs a number to assert to the carrier "
                           "(from, or the trunk's caller_id)", "withhold_caller_id")
        if not number:
            return "", asserted
        if spec is None:
            raise ApiError(400, "invalid_field", "from needs a trunk whose numbers include it", "from")
        at = trunk_of(to, None, self._policy())
        if at is not None and at != trunk:
            raise ApiError(400, "invalid_field", f"the call goes to trunk {at!r}'s address, not trunk {trunk!r}'s: "
                           "its numbers are not presented there", "from")
        allowed = [n for n in (spec.caller_id, *spec.caller_ids) if n]
        if number not in allowed:
            raise ApiError(400, "invalid_field", f"{number!r} is not one of trunk {trunk!r}'s numbers "
                           f"(caller_id, caller_ids: {', '.join(allowed) or 'none configured'})", "from")
        return number, asserted

    def _call_agent(self, body: dict, app: str) -> tuple[dict, str, str]:
        """POST /v1/calls's context, profile and language, checked (400 naming the field)."""
        try:
            context = callcontext.check(body.get("context", {}))
        except callcontext.ContextError as exc:
            raise ApiError(400, "invalid_field", exc.message, exc.field) from None
        raw = self.services.cfg.raw
        profile, language = body.get("profile", ""), body.get("language", "")
        if (profile or language) and app != "agent":
            raise ApiError(400, "invalid_field", "profile and language are the agent's (app: agent)",
                           "profile" if profile else "language")
        if profile and profile not in raw["profiles"]:
            raise ApiError(400, "invalid_field", f"no profile {profile!r} (configured: "
                           f"{', '.join(sorted(raw['profiles'])) or 'none'})", "profile")
        if language and language not in raw["languages"] and language != raw["agent"]["language"]:
            raise ApiError(400, "invalid_field", f"language {language!r} is not configured ([languages.{language}])",
                           "language")
        return context, profile, language

    def _policy(self) -> DestinationPolicy:
        cfg = self.services.cfg
        return DestinationPolicy.of(cfg.raw["sip"]["allowed_destinations"], cfg.raw["app"]["dtmf_transfer"].values(),
                                    cfg.trunks)

    def _check_destination(self, target: str, trunk: str | None) -> None:
        """Toll-fraud guard (sip.allowed_destinations): 403 naming the rule."""
        refusal = check_destination(target, trunk, self._policy())
        if refusal:
            raise ApiError(403, "destination_not_allowed", refusal, "to")
