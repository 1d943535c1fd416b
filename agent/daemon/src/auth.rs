//! Who may use the control socket: root, or a member of the `agt-jail` group. The peer's
//! uid comes from SO_PEERCRED; its groups from `/proc/<pid>/status` (primary and
//! supplementary), whose `Uid:` line must still name that uid (the pid was not reused).
use std::path::Path;

/// The gid of `group` in an `/etc/group`-format text.
pub fn group_gid(group_file: &str, group: &str) -> Option<u32> {
    group_file.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == group).then_some(())?;
        fields.next()?;
        fields.next()?.trim().parse().ok()
    })
}

/// The real uid and every gid (primary and supplementary) of a `/proc/<pid>/status` text.
pub fn status_ids(status: &str) -> Option<(u32, Vec<u32>)> {
    let field = |name: &str| status.lines().find_map(|line| line.strip_prefix(name));
    let uid = field("Uid:")?.split_whitespace().next()?.parse().ok()?;
    let mut gids: Vec<u32> = field("Gid:")?.split_whitespace().take(2).filter_map(|g| g.parse().ok()).collect();
    gids.extend(field("Groups:").unwrap_or("").split_whitespace().filter_map(|g| g.parse::<u32>().ok()));
    Some((uid, gids))
}

/// Why a peer is refused, as the client shows it.
pub fn refusal(uid: u32) -> String {
    format!(
        "permission denied: uid {uid} may not use the agt-jail daemon (only root and members of the group {} may)",
        crate::GROUP
    )
}

/// Whether the peer `(pid, uid, gid)` may use the socket. `group` is the agt-jail group's
/// gid, `None` when the group does not exist (root only then).
pub fn allowed(proc_root: &Path, peer: (u32, u32, u32), group: Option<u32>) -> bool {
    let (pid, uid, gid) = peer;
    if uid == 0 {
        return true;
    }
    let Some(group) = group else { return false };
    if gid == group {
        return true;
    }
    match std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok().as_deref().and_then(status_ids) {
        Some((status_uid, gids)) => status_uid == uid && gids.contains(&group),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const STATUS: &str =
        "Name:\tbash\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t4 27 998 \n";

    #[test]
    fn parses_groups_and_status() {
        let groups = "root:x:0:\nagt:x:5:\nagt-jail:x:998:alice,bob\n";
        assert_eq!(group_gid(groups, "agt-jail"), Some(998));
        assert_eq!(group_gid(groups, "agt"), Some(5));
        assert_eq!(group_gid(groups, "missing"), None);
        assert_eq!(group_gid("agt-jail:x:notanumber:\n", "agt-jail"), None);
        assert_eq!(status_ids(STATUS), Some((1000, vec![1000, 1000, 4, 27, 998])));
        assert_eq!(status_ids("Name: x\n"), None);
    }

    #[test]
    fn root_members_and_strangers() {
        let proc_root = tempfile::tempdir().unwrap();
        std::fs::create_dir(proc_root.path().join("42")).unwrap();
        std::fs::write(proc_root.path().join("42/status"), STATUS).unwrap();
        assert!(allowed(proc_root.path(), (1, 0, 0), None), "root without the group");
        assert!(!allowed(proc_root.path(), (42, 1000, 1000), None), "no group: root only");
        assert!(allowed(proc_root.path(), (42, 1000, 1000), Some(998)), "supplementary member");
        assert!(allowed(proc_root.path(), (7, 1000, 998), Some(998)), "primary group");
        assert!(!allowed(proc_root.path(), (42, 1000, 1000), Some(999)), "not a member");
        assert!(!allowed(proc_root.path(), (42, 1001, 1001), Some(998)), "pid now another user's");
        assert!(!allowed(proc_root.path(), (43, 1000, 1000), Some(998)), "gone");
        assert!(refusal(65534).contains("uid 65534") && refusal(1).contains("agt-jail"));
    }
}
