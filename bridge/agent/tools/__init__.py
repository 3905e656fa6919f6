"""REST tools the agent calls: argument checks, templates, response maps, breaker, runner.
May import: bridge.core, sip.uri, and each other."""
