//! ggml tensor types: ids, block geometry and names.
//!
//! Only the types DeepSeek V4 files use are modelled; any other id is
//! rejected by the reader (with the id in the error) rather than carried as an
//! opaque blob, because nothing downstream could use such a tensor anyway.

/// A ggml tensor element type (spec §1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q8_0,
    Q2_K,
    Q4_K,
    Q8_K,
    IQ2_XXS,
    I32,
    BF16,
}

impl GgmlType {
    /// Every supported type, in id order (handy for tests and tools).
    pub const ALL: [GgmlType; 9] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q4_K,
        GgmlType::Q8_K,
        GgmlType::IQ2_XXS,
        GgmlType::I32,
        GgmlType::BF16,
    ];

    /// Map a ggml type id to a supported type; `None` for anything else.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2_K,
            12 => GgmlType::Q4_K,
            15 => GgmlType::Q8_K,
            16 => GgmlType::IQ2_XXS,
            26 => GgmlType::I32,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q4_K => 12,
            GgmlType::Q8_K => 15,
            GgmlType::IQ2_XXS => 16,
            GgmlType::I32 => 26,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block (1 for plain scalar types).
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::I32 | GgmlType::BF16 => 1,
            GgmlType::Q8_0 => 32,
            GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::Q8_K | GgmlType::IQ2_XXS => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::I32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2_K => 84,
            GgmlType::Q4_K => 144,
            GgmlType::Q8_K => 292,
            GgmlType::IQ2_XXS => 66,
        }
    }

    /// Bytes of `n_elems` consecutive elements; `None` if `n_elems` is not a
    /// whole number of blocks or the size overflows `usize`.
    pub fn row_bytes(self, n_elems: usize) -> Option<usize> {
        let be = self.block_elems();
        if n_elems % be != 0 {
            return None;
        }
        (n_elems / be).checked_mul(self.block_bytes())
    }

    /// The ggml name ("Q8_0", "IQ2_XXS", ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q8_K => "Q8_K",
            GgmlType::IQ2_XXS => "IQ2_XXS",
            GgmlType::I32 => "I32",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Parse a name as printed by [`GgmlType::name`] (case-insensitive).
    pub fn from_name(s: &str) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// Whether [`crate::quant::dequantize`] / `dot_f32` accept this type as weights.
    pub fn is_float_decodable(self) -> bool {
        !matches!(self, GgmlType::I32)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_geometry() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::from_name(t.name()), Some(t));
            assert_eq!(t.row_bytes(t.block_elems() * 3), Some(3 * t.block_bytes()));
        }
        assert_eq!(GgmlType::from_id(2), None);
        assert_eq!(GgmlType::Q8_0.row_bytes(33), None);
        assert_eq!(GgmlType::Q2_K.row_bytes(4096), Some(16 * 84));
        assert_eq!(GgmlType::F32.row_bytes(usize::MAX), None);
    }
}
