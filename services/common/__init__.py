"""Plumbing shared by every service: settings, logging, errors, server bootstrap, channels."""
