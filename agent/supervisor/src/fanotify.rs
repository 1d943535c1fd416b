//! File decisions on the synchronous path: fanotify permission events on the jail's mounts.
