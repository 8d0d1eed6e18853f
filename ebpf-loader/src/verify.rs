//! Loading every program of the object into the kernel, to prove the verifier
//! accepts them on this kernel before anything depends on them.

use aya::{EbpfLoader, programs::Program};

use crate::{Error, OBJECT, Result};

/// Outcome of loading one program.
#[derive(Debug)]
pub struct Verified {
    /// Program name.
    pub name: String,
    /// Program type as aya names it, e.g. `CgroupSockAddr`.
    pub kind: String,
}

/// Loads (but does not attach) every program in the embedded object.
///
/// Returns the programs that loaded; the first one the verifier rejects is an
/// error naming it, with the verifier log.
pub fn verify_all() -> Result<Vec<Verified>> {
    let mut ebpf = EbpfLoader::new().load(OBJECT)?;
    let mut verified = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        let (kind, loaded) = match program {
            Program::CgroupSockAddr(p) => ("CgroupSockAddr", p.load()),
            Program::CgroupSock(p) => ("CgroupSock", p.load()),
            Program::CgroupSockopt(p) => ("CgroupSockopt", p.load()),
            Program::SockOps(p) => ("SockOps", p.load()),
            Program::SkMsg(p) => ("SkMsg", p.load()),
            Program::SkLookup(p) => ("SkLookup", p.load()),
            Program::SchedClassifier(p) => ("SchedClassifier", p.load()),
            other => {
                return Err(Error::Unsupported {
                    name: name.to_owned(),
                    kind: format!("{:?}", other.prog_type()),
                });
            }
        };
        loaded.map_err(|source| Error::Verifier {
            name: name.to_owned(),
            source,
        })?;
        verified.push(Verified {
            name: name.to_owned(),
            kind: kind.to_owned(),
        });
    }
    verified.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(verified)
}
