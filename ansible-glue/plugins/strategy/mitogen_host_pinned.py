# arbor: Mitogen's strategy name `mitogen_host_pinned`, for an ansible.cfg that
# still names it (`strategy = mitogen_host_pinned`). arbor needs no strategy of its
# own: this is Ansible's own `host_pinned`, under Mitogen's name. Put this directory
# on `strategy_plugins` in place of Mitogen's.
from __future__ import annotations

from ansible.plugins.strategy.host_pinned import StrategyModule as _Builtin
from ansible.utils.display import Display

DOCUMENTATION = """{name: mitogen_host_pinned, author: arbor, short_description: "Ansible's own host_pinned strategy, under Mitogen's name (arbor)",
  description: ["arbor works through connection plugins under Ansible's own strategies; this name lets an ansible.cfg written for Mitogen run unchanged."]}"""


class StrategyModule(_Builtin):
    def __init__(self, *args, **kwargs):
        super(StrategyModule, self).__init__(*args, **kwargs)
        Display().vvv("arbor: strategy mitogen_host_pinned is Ansible's own host_pinned")
