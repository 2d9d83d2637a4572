//! What the loader checks in a plugin file before the dynamic loader sees it: that it is a
//! complete shared object for this machine (a half-copied file maps segments past its end,
//! and touching them is SIGBUS), and which symbols it defines itself (`dlsym` also finds
//! its dependencies' symbols, so a hook name alone proves nothing).

use std::collections::HashMap;

use object::{
    Endianness,
    elf::{self, FileHeader64},
    read::elf::{FileHeader, ProgramHeader, Sym},
};

/// A symbol the plugin's own dynamic symbol table defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defined {
    /// `STT_*`.
    pub kind: u8,
    pub size: u64,
}

impl Defined {
    pub fn is_data_object(self) -> bool {
        self.kind == elf::STT_OBJECT
    }

    pub fn kind_name(self) -> &'static str {
        match self.kind {
            elf::STT_OBJECT => "data object",
            elf::STT_FUNC => "function",
            elf::STT_TLS => "thread-local variable",
            elf::STT_GNU_IFUNC => "indirect function",
            elf::STT_COMMON => "common block",
            _ => "symbol that is not a data object",
        }
    }
}

/// The facts about a checked plugin file the host needs later.
#[derive(Debug, Default)]
pub struct Checked {
    /// Symbols defined (not merely referenced) in the plugin's `.dynsym`, by name.
    pub defined: HashMap<String, Defined>,
    /// The file was built by Go (it has a `.go.buildinfo` section), so opening it starts a
    /// Go runtime: known before `dlopen`, which is when that runtime starts.
    pub go_runtime: bool,
}

/// Checks `data` is a 64-bit ELF shared object for this machine whose every `PT_LOAD`
/// segment lies within the file, and reads its own dynamic symbols.
pub fn check(data: &[u8]) -> Result<Checked, String> {
    if data.len() < 4 || &data[..4] != b"\x7fELF" {
        return Err("not an ELF file".to_owned());
    }
    let header = FileHeader64::<Endianness>::parse(data)
        .map_err(|e| format!("not a 64-bit ELF file, or its header is cut short ({e})"))?;
    let endian = header.endian().map_err(|e| format!("bad ELF header: {e}"))?;
    if header.e_type(endian) != elf::ET_DYN {
        return Err(
            "an ELF file, but not a shared object (build it with -shared / crate-type = [\"cdylib\"])".to_owned()
        );
    }
    let machine = header.e_machine(endian);
    if let Some(host) = host_machine()
        && machine != host
    {
        return Err(format!("built for another machine (ELF e_machine {machine}, this gateway runs on {host})"));
    }
    let segments = header
        .program_headers(endian, data)
        .map_err(|e| format!("its program headers lie outside the file, which is cut short ({e})"))?;
    let len = data.len() as u64;
    for ph in segments.iter().filter(|ph| ph.p_type(endian) == elf::PT_LOAD) {
        let (offset, size) = (ph.p_offset(endian), ph.p_filesz(endian));
        match offset.checked_add(size) {
            Some(end) if end <= len => {}
            _ => {
                return Err(format!(
                    "a loadable segment (offset {offset}, {size} bytes) extends past the end of the file ({len} bytes): the file is truncated or still being written"
                ));
            }
        }
    }
    let mut checked = Checked::default();
    let sections =
        header.sections(endian, data).map_err(|e| format!("its section headers lie outside the file ({e})"))?;
    checked.go_runtime = sections.iter().any(|s| sections.section_name(endian, s).is_ok_and(|n| n == b".go.buildinfo"));
    let symbols = sections
        .symbols(endian, data, elf::SHT_DYNSYM)
        .map_err(|e| format!("its dynamic symbol table lies outside the file ({e})"))?;
    for sym in symbols.iter() {
        if sym.is_undefined(endian) || sym.st_shndx(endian) == elf::SHN_ABS {
            continue;
        }
        let Ok(name) = symbols.symbol_name(endian, sym) else { continue };
        let Ok(name) = std::str::from_utf8(name) else { continue };
        if name.is_empty() {
            continue;
        }
        checked.defined.insert(name.to_owned(), Defined { kind: sym.st_type(), size: sym.st_size(endian) });
    }
    Ok(checked)
}

/// The `e_machine` of the architecture this gateway was built for.
fn host_machine() -> Option<u16> {
    if cfg!(target_arch = "x86_64") {
        Some(elf::EM_X86_64)
    } else if cfg!(target_arch = "aarch64") {
        Some(elf::EM_AARCH64)
    } else if cfg!(target_arch = "riscv64") {
        Some(elf::EM_RISCV)
    } else if cfg!(target_arch = "powerpc64") {
        Some(elf::EM_PPC64)
    } else if cfg!(target_arch = "s390x") {
        Some(elf::EM_S390)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running test binary is an ELF file of this machine (a PIE: ET_DYN).
    fn own_binary() -> Vec<u8> {
        std::fs::read(std::env::current_exe().expect("current exe")).expect("read the test binary")
    }

    #[test]
    fn a_complete_file_passes_and_its_prefixes_do_not() {
        let data = own_binary();
        if let Err(e) = check(&data) {
            // A non-PIE build of the test binary is not ET_DYN: nothing to check here.
            assert!(e.contains("not a shared object"), "{e}");
            return;
        }
        for cut in [16, 64, 1000, data.len() / 3, data.len() / 2, data.len() - 1] {
            assert!(check(&data[..cut]).is_err(), "a {cut}-byte prefix of a {}-byte file passed", data.len());
        }
    }

    #[test]
    fn garbage_is_not_an_elf_file() {
        assert_eq!(check(b"#!/bin/sh\necho hi\n").expect_err("a script"), "not an ELF file");
        let mut junk = b"\x7fELF".to_vec();
        junk.extend(std::iter::repeat_n(0xAB, 200));
        assert!(check(&junk).is_err());
    }
}
