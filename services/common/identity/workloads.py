"""The workloads of the bank and their SPIFFE IDs under the ztbank scheme."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.identity.spiffe_id import SpiffeId

ENV, ZONE = "prod", "az1"


@dataclass(frozen=True)
class Workload:
    name: str
    team: str

    def spiffe_id(self, trust_domain: str) -> SpiffeId:
        return SpiffeId.for_workload(
            trust_domain, env=ENV, zone=ZONE, team=self.team, service=self.name
        )


TELLER = Workload("teller", "channels")  # the channel app; the CLI acts as it
GATEWAY = Workload("gateway", "channels")
TRANSFER_ENGINE = Workload("transfer-engine", "payments")
RISK = Workload("risk", "risk")
OPS = Workload("ops", "platform")  # `ztbank status` probes with it; the health service only
# The lab console: no rule lets it call anything; its SVID names who started a lab.
CONSOLE = Workload("console", "platform")

SERVICES = (GATEWAY, TRANSFER_ENGINE, RISK)
