//! Small helpers shared by the loaders: finding programs and maps in a
//! loaded object, pinning links, and turning aya errors into [`Error`]s that
//! name the program or map.

use std::{
    fs::{self, File},
    path::Path,
};

use aya::{Ebpf, programs::links::FdLink};

use crate::{Error, Result};

pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(prog_err(name))
}

pub(crate) fn take_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T> {
    let map = ebpf.take_map(name).ok_or_else(|| Error::Map {
        name,
        source: aya::maps::MapError::InvalidName {
            name: name.to_owned(),
        },
    })?;
    convert(map).map_err(map_err(name))
}

/// Converts a cgroup link (created with `bpf_link_create` on any kernel we
/// support) to a pinnable [`FdLink`].
pub(crate) fn fd_link<L>(link: L, name: &'static str) -> Result<FdLink>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    FdLink::try_from(link).map_err(|source| Error::Program {
        name,
        source: source.into(),
    })
}

pub(crate) fn pin_link(link: FdLink, path: &Path) -> Result<()> {
    link.pin(path).map_err(|source| Error::Pin {
        what: "link",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

pub(crate) fn remove_pin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            what: "removing pin",
            path: path.to_path_buf(),
            source,
        }),
    }
}

pub(crate) fn open(path: &Path, what: &'static str) -> Result<File> {
    File::open(path).map_err(|source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn prog_err(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> Error {
    move |source| Error::Program { name, source }
}

pub(crate) fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// Attaches the cgroup program `$name` of type `$ty` in `$ebpf` to `$cgroup`
/// and pins the link at `$pin`. A macro because aya's cgroup program types
/// share `attach`/`take_link` by convention, not through a trait.
macro_rules! attach_cgroup_pinned {
    ($ebpf:expr, $ty:ty, $name:expr, $cgroup:expr, $pin:expr) => {{
        let program: &mut $ty = $crate::object::program($ebpf, $name)?;
        // A cgroup bpf_link always coexists with other programs; the kernel
        // refuses multi-attach flags on link creation, so pass none.
        let id = program
            .attach($cgroup, aya::programs::CgroupAttachMode::Single)
            .map_err($crate::object::prog_err($name))?;
        let link = program
            .take_link(id)
            .map_err($crate::object::prog_err($name))?;
        $crate::object::pin_link($crate::object::fd_link(link, $name)?, $pin)
    }};
}
pub(crate) use attach_cgroup_pinned;
