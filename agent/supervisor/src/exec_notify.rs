//! Exec decisions on the synchronous path: seccomp user-notification on execve/execveat.
