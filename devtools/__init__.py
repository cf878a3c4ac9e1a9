"""Development tooling, not part of the installed package: the fake provider, the demo and
the mitmdump runner that the tests and the benchmark drive."""
