"""`coilsight run` with the crash-recovery hook of agent/recovery.py wired in.

agent/service.py is the lead's file; until it calls the hook itself (``from agent import
recovery`` there), the reliability tests run this entry point, which adds exactly the three
calls the hook's docstring asks service.py for and nothing else. Usage as `coilsight run`:

    python -m tests.reliability.hooked_agent --config agent.toml
"""
from __future__ import annotations

import argparse
import sys

import agent.service as service
from agent import recovery


class HookedAgent(service.Agent):
    def start(self) -> None:
        # Same as Agent.start, with the restore between the inference thread and ingest: wrap
        # Ingest.start so the restore runs right before the first frame can be admitted.
        original = service.Ingest.start

        def start_ingest(ingest_self):
            self.recovery = recovery.Recovery(self.journal.dir / recovery.CHECKPOINT_NAME)
            for topic, body in self.recovery.restore(self.coils, self.journal):
                if topic == "summary":
                    self._emit_summary(body)
                else:
                    self.publisher.submit(topic, body)
            original(ingest_self)

        service.Ingest.start = start_ingest
        try:
            super().start()
        finally:
            service.Ingest.start = original

    def _tick(self) -> None:
        super()._tick()
        self.recovery.save(self.coils, self.journal.last_seq)

    def shutdown(self) -> None:
        was_running = self.state != "stopped"
        super().shutdown()
        if was_running and self.exit_code == 0 and hasattr(self, "recovery"):
            self.recovery.clear(self.coils, self.journal.last_seq)


def main(argv: list[str] | None = None) -> int:
    from agent.commands import _setup_logging
    from agent.config import load_config

    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    _setup_logging(cfg)
    return HookedAgent(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
