"""The documentation of arbor's connection plugins, built when each plugin
loads: the builtin plugin's options plus arbor's own (`ansible-doc` shows
the literal in the plugin's file; a run sees what is built here).

Built as JSON, which YAML loaders read: every run loads all of the glue's
40-odd connection plugins before its first task (Ansible preloads plugins
for its workers) and parses each one's documentation with its own YAML
loader for the config definitions; JSON text is about half the work of the
block YAML PyYAML dumps, and is dumped in a fraction of the time."""

from __future__ import annotations

import json

import yaml

# libyaml's loader where PyYAML has it: Ansible loads every plugin in the
# glue's directory, and each builds its documentation at import.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def yaml_load(text):
    return yaml.load(text, Loader=_YAML_LOADER)


def dump(doc):
    return json.dumps(doc, separators=(",", ":"))


def with_options(builtin_doc, short_description, options):
    """A builtin plugin's documentation with arbor's `options` added."""
    doc = yaml_load(builtin_doc)
    doc["short_description"] = short_description
    doc.setdefault("options", {}).update(options)
    return dump(doc)


def container_documentation(method, arbor_options):
    """Options of arbor's plugin for a container method: the host and user,
    and arbor's own options."""
    doc = {
        "name": method,
        "short_description": "run in a %s container, through arbor's relay on its host" % method,
        "description": ["Reaches the container from the host in its arbor_via/mitogen_via, whose relay"
                        " runs the container tool; like Mitogen's method of the same name."],
        "author": "arbor",
        "options": {
            "remote_addr": {"description": "The container's name.", "type": "str",
                            "default": "inventory_hostname",
                            "vars": [{"name": "inventory_hostname"}, {"name": "ansible_host"},
                                     {"name": "ansible_%s_host" % method}]},
            "remote_user": {"description": "The user in the container.", "type": "str",
                            "vars": [{"name": "ansible_user"}, {"name": "ansible_%s_user" % method}]},
        },
    }
    for name in ("arbor_via", "arbor_inventory_hostname", "arbor_python", "arbor_task_isolation", "arbor_persist"):
        doc["options"][name] = arbor_options[name]
    doc["options"]["timeout"] = {"description": "Seconds a become prompt may take.", "type": "int",
                                 "default": 10, "vars": [{"name": "ansible_timeout"}]}
    return dump(doc)
