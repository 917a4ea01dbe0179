"""How the backbone runs: settings, the embedded broker and registry, topic provisioning, the CLI."""
