"""Stand-ins (fewstep's own) for the helpers the vendored file imports from diffusers' tests/others/."""
