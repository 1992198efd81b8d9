//! `PowerCutFs`: a small in-memory FUSE filesystem that simulates power cuts.
//!
//! A test mounts it with [`PowerCutFs::mount`], runs a real process with its data directory
//! under [`PowerCutFs::path`], SIGKILLs that process, calls [`PowerCutFs::cut`] and starts the
//! process again: what it finds is what a machine that lost power at the moment of the kill
//! would have kept, under the model below. LazyFS's `clear-cache`, in-process and tiny.
//!
//! # Durability model
//!
//! * Every regular file has two contents: the bytes readers see now and the *durable* bytes.
//!   `write`, size changes through `setattr` (truncate or extend) and `fallocate` change only
//!   what readers see. `fsync`/`fdatasync` of a file (FUSE `fsync`) make its current content,
//!   length included, durable. [`PowerCutFs::cut`] reverts every file to its durable content:
//!   a file that was never fsynced becomes empty.
//! * Changes are tracked per 4 KiB page (a set of dirty page indexes; every page between the
//!   visible and the durable length is dirty), so `fsync` and `cut` cost O(dirty pages), not
//!   O(file size).
//! * Names are *not* subject to the cut (a simplification: a real filesystem may lose a name
//!   whose directory was not fsynced). `create`, `mknod`, `mkdir`, `unlink`, `rmdir` and
//!   `rename` take effect at once and survive a cut, as do modes, owners and times.
//!   `fsyncdir` is accepted and counted but changes nothing.
//!
//! # Kernel caches
//!
//! * No writeback cache (the FUSE default): each `write(2)` reaches this filesystem before it
//!   returns, so nothing a killed process wrote stays behind in the kernel. Pages dirtied
//!   through a shared writable `mmap` (SQLite's `-shm`) reach it when written back, at the
//!   latest when the file is closed as the process dies; for a mapping still alive, `cut`
//!   first makes the kernel write dirty pages back, then reverts, then drops the pages.
//! * Entries and attributes are replied with TTL 0, so sizes are never stale, and `cut`
//!   invalidates the cached pages and attributes of every inode through fuser's `Notifier`,
//!   so later readers see only the durable state. No `direct_io`: `mmap` needs the page cache.
//! * `getlk`/`setlk` are not implemented and fuser does not ask for `FUSE_POSIX_LOCKS` (nor
//!   `FUSE_FLOCK_LOCKS`), so the kernel keeps `fcntl` (and `flock`) locks itself, on its
//!   inode: they work between processes and between connections of one process, and vanish
//!   with their process, as after a real crash.
//!
//! # Limits
//!
//! Everything lives in memory, twice per file, without sparse files; files are limited to
//! 16 GiB. No symlinks, hard links, xattrs or `RENAME_EXCHANGE`. The mount needs root
//! (mount(2) directly: no `fusermount`, no `auto_unmount`); a test process that dies without
//! running `Drop` (e.g. SIGKILLed) leaves a dead mount behind in the temp dir.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use libc::{FALLOC_FL_KEEP_SIZE as KEEP, FALLOC_FL_PUNCH_HOLE as PUNCH};
use libc::{FALLOC_FL_ZERO_RANGE as ZERO, MNT_DETACH};

use fuser::{
    AccessFlags, BackgroundSession, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, LockOwner, MountOption, Notifier, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};

/// Granularity of dirty tracking, in bytes; also the block size reported to `stat`.
const PAGE: usize = 4096;
/// Largest file size accepted (`EFBIG` beyond): files live in memory, twice.
const MAX_SIZE: u64 = 1 << 34;
/// Validity of entries and attributes given to the kernel: none, it always asks again.
const TTL: Duration = Duration::ZERO;
/// Inode number of the root directory.
const ROOT: u64 = INodeNo::ROOT.0;

/// What operations answer: attributes (by default) or an error.
type Res<T = FileAttr> = Result<T, Errno>;

/// A mounted power-cut filesystem. Dropping it unmounts it and removes the mount point.
pub struct PowerCutFs {
    /// The filesystem, shared with the session thread.
    state: Arc<Mutex<State>>,
    /// The running session; taken by `Drop`.
    session: Option<BackgroundSession>,
    /// Sends cache invalidations to the kernel.
    notifier: Notifier,
    /// The mount point (canonical path of `dir`).
    path: PathBuf,
    /// The temporary directory mounted on; removed on drop unless still mounted.
    dir: Option<tempfile::TempDir>,
}

impl PowerCutFs {
    /// Mounts an empty filesystem on a fresh temporary directory.
    /// Err(reason) when FUSE cannot be used here (no /dev/fuse, not root, mount refused),
    /// so a test can print the reason and skip.
    pub fn mount() -> Result<PowerCutFs, String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("no /dev/fuse (FUSE module not loaded or not visible here)".into());
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root: PowerCutFs mounts with mount(2), which needs root".into());
        }
        let dir = tempfile::Builder::new()
            .prefix("edgefn-powercut.")
            .tempdir()
            .map_err(|e| format!("cannot create a mount point: {e}"))?;
        let path = dir
            .path()
            .canonicalize()
            .map_err(|e| format!("mount point: {e}"))?;
        let state = Arc::new(Mutex::new(State::new()));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("edgefn-powercut".into()),
            MountOption::DefaultPermissions,
        ];
        config.acl = SessionACL::All;
        let session = fuser::spawn_mount(Fs(state.clone()), &path, &config).map_err(|e| {
            // fuser falls back to the fusermount3 binary when mount(2) says EPERM.
            let hint = match e.kind() {
                std::io::ErrorKind::NotFound => " (mount(2) refused, e.g. without CAP_SYS_ADMIN)",
                _ => "",
            };
            format!("FUSE mount on {} refused: {e}{hint}", path.display())
        })?;
        let notifier = session.notifier();
        let (session, dir) = (Some(session), Some(dir));
        Ok(PowerCutFs {
            state,
            session,
            notifier,
            path,
            dir,
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A simulated power cut: every file's content goes back to what its last fsync made
    /// durable (a file never fsynced becomes empty); kernel caches of the mount are
    /// invalidated so later readers see only the durable state. Call it after the writing
    /// process was killed.
    pub fn cut(&self) {
        let inos: Vec<u64> = lock(&self.state).nodes.keys().copied().collect();
        // First pass: the kernel writes back pages still dirty in a live shared mapping, so
        // they cannot land after the revert. Without the lock: the session thread serves it.
        self.invalidate(&inos);
        for node in lock(&self.state).nodes.values_mut() {
            if let Body::File(data) = &mut node.body {
                data.revert();
            }
        }
        // Second pass: drop the cached pages that still hold the pre-cut content.
        self.invalidate(&inos);
    }

    /// fsync calls served so far (file and directory).
    pub fn fsyncs(&self) -> u64 {
        lock(&self.state).fsyncs
    }

    /// Makes the kernel drop cached pages and attributes of `inos`.
    fn invalidate(&self, inos: &[u64]) {
        for &ino in inos {
            // fuser already maps ENOENT (inode not cached by the kernel) to Ok.
            if let Err(e) = self.notifier.inval_inode(INodeNo(ino), 0, 0) {
                eprintln!("powercut: invalidating inode {ino}: {e}");
            }
        }
    }
}

impl Drop for PowerCutFs {
    /// Unmounts (lazily if still busy, e.g. a leaked child keeps files open), waits for the
    /// session thread after an immediate unmount, then removes the mount point.
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let c_path = CString::new(self.path.as_os_str().as_bytes()).expect("path without NUL");
        // SAFETY: c_path is a valid NUL-terminated string that outlives both calls.
        if unsafe { libc::umount2(c_path.as_ptr(), 0) } == 0 {
            let _ = session.join(); // the kernel ended the connection: the thread returns
        } else if unsafe { libc::umount2(c_path.as_ptr(), MNT_DETACH) } != 0 {
            // Still mounted: removing the directory would recurse into the live filesystem.
            eprintln!("powercut: cannot unmount {}", self.path.display());
            let _ = self.dir.take().map(tempfile::TempDir::keep);
        }
        // Detached: the session thread serves the last users and ends with them, while the
        // now plain directory is removed as `dir` drops.
    }
}

/// Locks the state, ignoring poisoning (a panicking test must still be able to unmount).
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Content of a regular file: what readers see now and what survives a cut.
#[derive(Default)]
struct Data {
    /// The bytes readers see now.
    cur: Vec<u8>,
    /// The bytes the last fsync made durable.
    durable: Vec<u8>,
    /// Pages where `cur` may differ from `durable`, including every page between the lengths.
    dirty: BTreeSet<usize>,
}

impl Data {
    /// Marks the pages touching bytes `a..b` dirty.
    fn mark(&mut self, a: usize, b: usize) {
        if a < b {
            self.dirty.extend(a / PAGE..=(b - 1) / PAGE);
        }
    }

    /// Sets the visible length, zero-filling when it grows.
    fn set_len(&mut self, len: usize) {
        let old = self.cur.len();
        self.cur.resize(len, 0);
        self.mark(old.min(len), old.max(len));
    }

    /// Writes `buf` at `off`, growing the file (zeros in any hole) as needed.
    fn write(&mut self, off: usize, buf: &[u8]) {
        let end = off + buf.len();
        if end > self.cur.len() {
            self.set_len(end);
        }
        self.cur[off..end].copy_from_slice(buf);
        self.mark(off, end);
    }

    /// Gives `to` the length of `from` and copies the `dirty` pages of `from` into it.
    fn copy_dirty(dirty: &BTreeSet<usize>, from: &[u8], to: &mut Vec<u8>) {
        to.resize(from.len(), 0);
        let starts = dirty.iter().map(|page| page * PAGE);
        for a in starts.take_while(|&a| a < from.len()) {
            let b = (a + PAGE).min(from.len());
            to[a..b].copy_from_slice(&from[a..b]);
        }
    }

    /// fsync: the visible content becomes durable.
    fn sync(&mut self) {
        Self::copy_dirty(&self.dirty, &self.cur, &mut self.durable);
        self.dirty.clear();
    }

    /// Power cut: the visible content goes back to the durable one.
    fn revert(&mut self) {
        Self::copy_dirty(&self.dirty, &self.durable, &mut self.cur);
        self.dirty.clear();
    }
}

/// What an inode holds besides its attributes.
enum Body {
    /// A regular file's content.
    File(Data),
    /// A directory's entries: name to inode number.
    Dir(BTreeMap<OsString, u64>),
    /// A FIFO, socket or device node: a name only.
    Other,
}

/// One inode.
struct Node {
    /// Attributes as `stat` shows them (size and blocks are filled in when replying).
    attr: FileAttr,
    /// Directories: the parent directory (for `..`).
    parent: u64,
    /// Open handles: a removed inode (nlink 0) lives until the last one is released.
    open: u32,
    /// Content.
    body: Body,
}

impl Node {
    /// A new inode of `kind` and `perm` (masked to 0o7777) owned by `uid:gid`.
    fn new(kind: FileType, perm: u32, (uid, gid): (u32, u32), parent: u64, body: Body) -> Node {
        let now = SystemTime::now();
        let attr = FileAttr {
            ino: INodeNo(0),
            size: 0,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm: (perm & 0o7777) as u16,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid,
            gid,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        };
        Node {
            attr,
            parent,
            open: 0,
            body,
        }
    }
}

/// The whole filesystem.
struct State {
    /// Inodes by number.
    nodes: HashMap<u64, Node>,
    /// Next inode number to hand out.
    next_ino: u64,
    /// fsync and fsyncdir calls served.
    fsyncs: u64,
}

impl State {
    /// An empty filesystem: a root directory open to everyone (0777), owned by us.
    fn new() -> State {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let owner = unsafe { (libc::getuid(), libc::getgid()) };
        let body = Body::Dir(BTreeMap::new());
        let root = Node::new(FileType::Directory, 0o777, owner, ROOT, body);
        let nodes = HashMap::from([(ROOT, root)]);
        State {
            nodes,
            next_ino: ROOT + 1,
            fsyncs: 0,
        }
    }

    /// The inode `ino`, or ENOENT.
    fn node(&mut self, ino: u64) -> Res<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    /// The entries of directory `ino`, or ENOTDIR.
    fn dir(&mut self, ino: u64) -> Res<&mut BTreeMap<OsString, u64>> {
        match &mut self.node(ino)?.body {
            Body::Dir(entries) => Ok(entries),
            _ => Err(Errno::ENOTDIR),
        }
    }

    /// The content of regular file `ino`, or EISDIR / EINVAL.
    fn file(&mut self, ino: u64) -> Res<&mut Data> {
        match &mut self.node(ino)?.body {
            Body::File(data) => Ok(data),
            Body::Dir(_) => Err(Errno::EISDIR),
            Body::Other => Err(Errno::EINVAL),
        }
    }

    /// The inode named `name` in directory `parent`.
    fn child(&mut self, parent: u64, name: &OsStr) -> Res<u64> {
        self.dir(parent)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    /// The attributes of `ino` as FUSE wants them.
    fn attr(&mut self, ino: u64) -> Res {
        let n = self.node(ino)?;
        let size = match &n.body {
            Body::File(data) => data.cur.len() as u64,
            Body::Dir(_) => PAGE as u64,
            Body::Other => 0,
        };
        let mut attr = n.attr;
        (attr.ino, attr.size, attr.blocks) = (INodeNo(ino), size, size.div_ceil(512));
        Ok(attr)
    }

    /// Links the new inode `node` as `name` in its parent; returns its attributes.
    fn make(&mut self, name: &OsStr, node: Node) -> Res {
        let (parent, now) = (node.parent, node.attr.ctime);
        let is_dir = node.attr.kind == FileType::Directory;
        if self.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        self.dir(parent)?.insert(name.to_owned(), ino);
        let p = &mut self.node(parent)?.attr;
        (p.mtime, p.ctime, p.nlink) = (now, now, p.nlink + u32::from(is_dir));
        self.attr(ino)
    }

    /// unlink (`dir` false) or rmdir (`dir` true) of `name` in `parent`.
    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Res<()> {
        let ino = self.child(parent, name)?;
        match (&self.node(ino)?.body, dir) {
            (Body::Dir(entries), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
            (Body::Dir(_), false) => return Err(Errno::EISDIR),
            (Body::File(_) | Body::Other, true) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        self.dir(parent)?.remove(name);
        let now = SystemTime::now();
        let n = &mut self.node(ino)?.attr;
        (n.nlink, n.ctime) = (if dir { 0 } else { n.nlink.saturating_sub(1) }, now);
        let p = &mut self.node(parent)?.attr;
        (p.mtime, p.ctime, p.nlink) = (now, now, p.nlink - u32::from(dir));
        self.reap(ino);
        Ok(())
    }

    /// Forgets `ino` if it has neither names nor open handles left.
    fn reap(&mut self, ino: u64) {
        let unused = |n: &Node| n.attr.nlink == 0 && n.open == 0;
        if self.nodes.get(&ino).is_some_and(unused) {
            self.nodes.remove(&ino);
        }
    }

    /// rename(2), with `RENAME_NOREPLACE`; replaces a file or an empty directory.
    fn rename(&mut self, p: u64, name: &OsStr, np: u64, new: &OsStr, fl: RenameFlags) -> Res<()> {
        if !(fl - RenameFlags::RENAME_NOREPLACE).is_empty() {
            return Err(Errno::EINVAL);
        }
        let src = self.child(p, name)?;
        let is_dir = self.node(src)?.attr.kind == FileType::Directory;
        self.dir(np)?; // (the kernel refused moving a directory under itself)
        if let Ok(dst) = self.child(np, new) {
            if fl.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            } else if dst == src {
                return Ok(());
            }
            self.remove(np, new, is_dir)?; // EISDIR, ENOTDIR, ENOTEMPTY as rename(2) wants
        }
        let now = SystemTime::now();
        self.dir(p)?.remove(name);
        self.dir(np)?.insert(new.to_owned(), src);
        for (dir, links) in [(p, -i64::from(is_dir)), (np, i64::from(is_dir))] {
            let d = &mut self.node(dir)?.attr;
            (d.mtime, d.ctime, d.nlink) = (now, now, (i64::from(d.nlink) + links) as u32);
        }
        let n = self.node(src)?;
        (n.attr.ctime, n.parent) = (now, if is_dir { np } else { n.parent });
        Ok(())
    }

    /// Applies `f` to file `ino` (`EFBIG` if it would end beyond `end`), updating mtime.
    fn change(&mut self, ino: u64, end: Option<u64>, f: impl FnOnce(&mut Data)) -> Res<()> {
        if end.is_none_or(|end| end > MAX_SIZE) {
            return Err(Errno::EFBIG);
        }
        f(self.file(ino)?);
        let n = &mut self.node(ino)?.attr;
        (n.mtime, n.ctime) = (SystemTime::now(), SystemTime::now());
        Ok(())
    }
}

/// The file type encoded in a `mode_t` (no type means a regular file, as for mknod).
fn kind_of(mode: u32) -> Option<FileType> {
    Some(match mode & libc::S_IFMT {
        0 | libc::S_IFREG => FileType::RegularFile,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => return None,
    })
}

/// Resolves a `setattr` time.
fn time_of(t: TimeOrNow, now: SystemTime) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => now,
    }
}

/// `answer!(reply, result, |value| success)`: runs `success`, or replies the error.
macro_rules! answer {
    ($reply:ident, $result:expr, |$v:pat_param| $ok:expr) => {
        match $result {
            Ok($v) => $ok,
            Err(e) => $reply.error(e),
        }
    };
}

/// The session thread's view of the state: fuser's `Filesystem`.
struct Fs(Arc<Mutex<State>>);

impl Fs {
    /// Locks the state.
    fn st(&self) -> MutexGuard<'_, State> {
        lock(&self.0)
    }

    /// Counts one more open handle on `ino`; the reply has no handle and no flags (page
    /// cache on, no direct_io).
    fn open_node(&self, ino: INodeNo, r: ReplyOpen) {
        let res = self.st().node(ino.0).map(|n| n.open += 1);
        answer!(r, res, |()| r.opened(FileHandle(0), FopenFlags::empty()));
    }

    /// Drops one open handle of `ino`, forgetting it if it was removed meanwhile.
    fn release_node(&self, ino: INodeNo, r: ReplyEmpty) {
        let mut st = self.st();
        if let Ok(n) = st.node(ino.0) {
            n.open = n.open.saturating_sub(1);
        }
        st.reap(ino.0);
        r.ok();
    }

    /// Creates a node of `kind` named `name` in `p`, owned by the caller.
    fn make(&self, q: &Request, p: INodeNo, name: &OsStr, kind: FileType, mode: u32) -> Res {
        let body = match kind {
            FileType::RegularFile => Body::File(Data::default()),
            FileType::Directory => Body::Dir(BTreeMap::new()),
            _ => Body::Other,
        };
        let node = Node::new(kind, mode, (q.uid(), q.gid()), p.0, body);
        self.st().make(name, node)
    }
}

impl Filesystem for Fs {
    /// Looks `name` up in `p`.
    fn lookup(&self, _: &Request, p: INodeNo, name: &OsStr, r: ReplyEntry) {
        let mut st = self.st();
        let res = st.child(p.0, name).and_then(|ino| st.attr(ino));
        answer!(r, res, |a| r.entry(&TTL, &a, Generation(0)));
    }

    /// Returns the attributes of `ino`.
    fn getattr(&self, _: &Request, ino: INodeNo, _: Option<FileHandle>, r: ReplyAttr) {
        answer!(r, self.st().attr(ino.0), |a| r.attr(&TTL, &a));
    }

    /// Changes size (not durable until fsync), mode, owner and times.
    fn setattr(
        &self,
        _: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _: Option<FileHandle>,
        _: Option<SystemTime>,
        _: Option<SystemTime>,
        _: Option<SystemTime>,
        _: Option<BsdFileFlags>,
        r: ReplyAttr,
    ) {
        let (mut st, now) = (self.st(), SystemTime::now());
        let res = (|| {
            if let Some(size) = size {
                st.change(ino.0, Some(size), |data| data.set_len(size as usize))?;
            }
            let n = &mut st.node(ino.0)?.attr;
            n.perm = mode.map_or(n.perm, |m| (m & 0o7777) as u16);
            (n.uid, n.gid) = (uid.unwrap_or(n.uid), gid.unwrap_or(n.gid));
            n.atime = atime.map_or(n.atime, |t| time_of(t, now));
            n.mtime = mtime.map_or(n.mtime, |t| time_of(t, now));
            n.ctime = ctime.unwrap_or(now);
            st.attr(ino.0)
        })();
        answer!(r, res, |a| r.attr(&TTL, &a));
    }

    /// Creates a regular file, FIFO, socket or device node.
    fn mknod(
        &self,
        q: &Request,
        p: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        r: ReplyEntry,
    ) {
        let res = kind_of(mode).ok_or(Errno::EINVAL);
        let res = res.and_then(|kind| self.make(q, p, name, kind, mode & !umask));
        let mut st = self.st();
        let res = res.and_then(|a| {
            st.node(a.ino.0)?.attr.rdev = rdev;
            st.attr(a.ino.0)
        });
        answer!(r, res, |a| r.entry(&TTL, &a, Generation(0)));
    }

    /// Creates a directory.
    fn mkdir(&self, q: &Request, p: INodeNo, name: &OsStr, mode: u32, umask: u32, r: ReplyEntry) {
        let res = self.make(q, p, name, FileType::Directory, mode & !umask);
        answer!(r, res, |a| r.entry(&TTL, &a, Generation(0)));
    }

    /// Removes a name that is not a directory.
    fn unlink(&self, _: &Request, p: INodeNo, name: &OsStr, r: ReplyEmpty) {
        answer!(r, self.st().remove(p.0, name, false), |()| r.ok());
    }

    /// Removes an empty directory.
    fn rmdir(&self, _: &Request, p: INodeNo, name: &OsStr, r: ReplyEmpty) {
        answer!(r, self.st().remove(p.0, name, true), |()| r.ok());
    }

    /// Renames, replacing the target if any.
    fn rename(
        &self,
        _: &Request,
        p: INodeNo,
        name: &OsStr,
        np: INodeNo,
        new: &OsStr,
        flags: RenameFlags,
        r: ReplyEmpty,
    ) {
        let res = self.st().rename(p.0, name, np.0, new, flags);
        answer!(r, res, |()| r.ok());
    }

    /// Opens a file (O_TRUNC arrives separately, as a setattr).
    fn open(&self, _: &Request, ino: INodeNo, _: OpenFlags, r: ReplyOpen) {
        self.open_node(ino, r);
    }

    /// Reads visible bytes.
    fn read(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        off: u64,
        size: u32,
        _: OpenFlags,
        _: Option<LockOwner>,
        r: ReplyData,
    ) {
        answer!(r, self.st().file(ino.0), |data| {
            let len = data.cur.len();
            let a = usize::try_from(off).map_or(len, |off| off.min(len));
            r.data(&data.cur[a..a.saturating_add(size as usize).min(len)]);
        });
    }

    /// Writes bytes: visible at once, durable at the next fsync.
    fn write(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        off: u64,
        buf: &[u8],
        _: WriteFlags,
        _: OpenFlags,
        _: Option<LockOwner>,
        r: ReplyWrite,
    ) {
        let end = off.checked_add(buf.len() as u64);
        let write = |data: &mut Data| data.write(off as usize, buf);
        let res = self.st().change(ino.0, end, write);
        answer!(r, res, |()| r.written(buf.len() as u32));
    }

    /// close(2) of one descriptor: nothing to do (no locks kept here).
    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, r: ReplyEmpty) {
        r.ok();
    }

    /// Last close of an open file.
    fn release(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        _: OpenFlags,
        _: Option<LockOwner>,
        _: bool,
        r: ReplyEmpty,
    ) {
        self.release_node(ino, r);
    }

    /// fsync/fdatasync: the file's visible content becomes durable.
    fn fsync(&self, _: &Request, ino: INodeNo, _: FileHandle, _: bool, r: ReplyEmpty) {
        let mut st = self.st();
        st.fsyncs += 1;
        answer!(r, st.node(ino.0), |n| {
            if let Body::File(data) = &mut n.body {
                data.sync();
            }
            r.ok()
        });
    }

    /// Opens a directory.
    fn opendir(&self, _: &Request, ino: INodeNo, _: OpenFlags, r: ReplyOpen) {
        self.open_node(ino, r);
    }

    /// Lists a directory: `.`, `..`, then the entries by name; offset = index + 1.
    fn readdir(&self, _: &Request, ino: INodeNo, _: FileHandle, off: u64, mut r: ReplyDirectory) {
        let st = self.st();
        let node = st.nodes.get(&ino.0).map(|n| (&n.body, n.parent));
        let Some((Body::Dir(entries), parent)) = node else {
            return r.error(Errno::ENOTDIR);
        };
        let dots = [(ino.0, OsStr::new(".")), (parent, OsStr::new(".."))];
        let names = entries.iter().map(|(name, &c)| (c, name.as_os_str()));
        for (i, (child, name)) in dots.into_iter().chain(names).enumerate().skip(off as usize) {
            let kind = st.nodes.get(&child).map(|n| n.attr.kind);
            let kind = kind.unwrap_or(FileType::RegularFile);
            if r.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        r.ok();
    }

    /// Closes a directory.
    fn releasedir(&self, _: &Request, ino: INodeNo, _: FileHandle, _: OpenFlags, r: ReplyEmpty) {
        self.release_node(ino, r);
    }

    /// fsync of a directory: counted; names are durable at once anyway.
    fn fsyncdir(&self, _: &Request, _: INodeNo, _: FileHandle, _: bool, r: ReplyEmpty) {
        self.st().fsyncs += 1;
        r.ok();
    }

    /// Reports 64 GiB in 4 KiB blocks and a million inodes, minus what is in use.
    fn statfs(&self, _: &Request, _: INodeNo, r: ReplyStatfs) {
        let st = self.st();
        let sizes = st.nodes.values().map(|n| match &n.body {
            Body::File(data) => data.cur.len().div_ceil(PAGE) as u64,
            _ => 1,
        });
        let (blocks, files) = (1u64 << 24, 1u64 << 20);
        let free = blocks.saturating_sub(sizes.sum());
        let ffree = files.saturating_sub(st.nodes.len() as u64);
        let bsize = PAGE as u32;
        r.statfs(blocks, free, free, files, ffree, bsize, 255, bsize);
    }

    /// access(2): allowed (with `default_permissions` the kernel checks and never asks).
    fn access(&self, _: &Request, ino: INodeNo, _: AccessFlags, r: ReplyEmpty) {
        answer!(r, self.st().node(ino.0), |_| r.ok());
    }

    /// Creates and opens a regular file.
    fn create(
        &self,
        q: &Request,
        p: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _: i32,
        r: ReplyCreate,
    ) {
        let res = self.make(q, p, name, FileType::RegularFile, mode & !umask);
        let opened = |a: FileAttr| self.st().node(a.ino.0).map(|n| n.open += 1).map(|()| a);
        let (fh, flags) = (FileHandle(0), FopenFlags::empty());
        let res = res.and_then(opened);
        answer!(r, res, |a| r.created(&TTL, &a, Generation(0), fh, flags));
    }

    /// fallocate: mode 0 and `KEEP_SIZE` (allocation), `PUNCH_HOLE` and `ZERO_RANGE`; like a
    /// write, not durable until fsync.
    fn fallocate(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        off: u64,
        len: u64,
        mode: i32,
        r: ReplyEmpty,
    ) {
        if mode & !(KEEP | PUNCH | ZERO) != 0 {
            return r.error(Errno::EOPNOTSUPP);
        }
        let end = off.checked_add(len);
        let res = self.st().change(ino.0, end, |data| {
            let end = end.unwrap_or(0) as usize;
            let (off, zero_end) = (off as usize, end.min(data.cur.len()));
            if mode & (PUNCH | ZERO) != 0 && off < zero_end {
                data.write(off, &vec![0; zero_end - off]);
            }
            if mode & KEEP == 0 && end > data.cur.len() {
                data.set_len(end);
            }
        });
        answer!(r, res, |()| r.ok());
    }
}
