package dev.acorn

import java.nio.ByteBuffer
import java.nio.ByteOrder

/** Element types, as the C API's `AcornDtype` codes. */
enum class DType(val code: Int, val byteSize: Int) {
    F32(1, 4), F16(2, 2), I8(3, 1), U8(4, 1), I32(5, 4), I64(6, 8), BOOL(7, 1),
    F64(8, 8), I16(9, 2), U16(10, 2), U32(11, 4), U64(12, 8),
    /** bfloat16 bits (ShortArray); the sub-byte integers one per byte (ByteArray), signed ones
     * sign-extended; the 8-bit floats, FP4 (one per byte) and E8M0 as their bits (ByteArray). */
    BF16(13, 2), I4(14, 1), U4(15, 1), I2(16, 1), U2(17, 1),
    F8E4M3FN(18, 1), F8E4M3FNUZ(19, 1), F8E5M2(20, 1), F8E5M2FNUZ(21, 1), F4E2M1(22, 1), F8E8M0(23, 1);

    companion object {
        @JvmStatic
        fun of(code: Int): DType = values().firstOrNull { it.code == code }
            ?: throw AcornException(Status.INVALID_ARGUMENT.code, "unknown dtype code $code")
    }
}

/** What a model declares about one input or output: a dimension of -1 is chosen at run time;
 * [shape] is null when the model declares none. */
class TensorInfo(val name: String, val dtype: DType, val shape: LongArray?) {
    override fun toString() = "$name: $dtype${shape?.joinToString(", ", "[", "]") ?: "[?]"}"
}

/**
 * A dense row-major tensor: a dtype, a shape and its elements, held as a primitive array of the
 * element size (FloatArray for F32, LongArray for I64 and U64, IntArray for I32 and U32,
 * DoubleArray for F64, ShortArray for F16/I16/U16, ByteArray for I8/U8/BOOL) or, for inputs, a
 * direct [ByteBuffer] in native byte order that the runtime reads in place without a copy.
 */
class Tensor private constructor(val dtype: DType, shape: LongArray, internal val data: Any) {
    private val dims: LongArray = shape.copyOf()

    /** The dimensions, outermost first (a copy). */
    val shape: LongArray get() = dims.copyOf()

    /** The number of elements. */
    val size: Long get() = dims.fold(1L) { a, d -> a * d }

    fun floats(): FloatArray = data as? FloatArray ?: throw wrongKind("floats()")
    fun longs(): LongArray = data as? LongArray ?: throw wrongKind("longs()")
    fun ints(): IntArray = data as? IntArray ?: throw wrongKind("ints()")
    fun doubles(): DoubleArray = data as? DoubleArray ?: throw wrongKind("doubles()")
    fun shorts(): ShortArray = data as? ShortArray ?: throw wrongKind("shorts()")
    fun bytes(): ByteArray = data as? ByteArray ?: throw wrongKind("bytes()")

    private fun wrongKind(what: String) =
        IllegalStateException("a $dtype tensor${if (data is ByteBuffer) " over a ByteBuffer" else ""} has no $what")

    override fun toString() = "Tensor($dtype${dims.joinToString(", ", "[", "]")})"

    companion object {
        private fun checked(dtype: DType, shape: LongArray, count: Long, data: Any): Tensor {
            require(shape.all { it >= 0 }) { "negative dimension in ${shape.contentToString()}" }
            val want = shape.fold(1L) { a, d -> a * d }
            require(want == count) { "shape ${shape.contentToString()} holds $want elements, the data $count" }
            return Tensor(dtype, shape, data)
        }

        @JvmStatic fun of(data: FloatArray, vararg shape: Long) = checked(DType.F32, shape, data.size.toLong(), data)
        @JvmStatic fun of(data: DoubleArray, vararg shape: Long) = checked(DType.F64, shape, data.size.toLong(), data)
        @JvmStatic fun of(data: LongArray, vararg shape: Long) = checked(DType.I64, shape, data.size.toLong(), data)
        @JvmStatic fun of(data: IntArray, vararg shape: Long) = checked(DType.I32, shape, data.size.toLong(), data)

        /** Bytes of a one-byte dtype: [DType.U8] (the default), [DType.I8] or [DType.BOOL]. */
        @JvmStatic @JvmOverloads
        fun ofBytes(data: ByteArray, shape: LongArray, dtype: DType = DType.U8): Tensor {
            require(dtype.byteSize == 1) { "$dtype is not a one-byte dtype" }
            return checked(dtype, shape, data.size.toLong(), data)
        }

        /**
         * A tensor over a direct buffer's remaining bytes, in the platform's byte order (little
         * endian on every Android and iOS device), read in place by the run: no copy. The
         * buffer must stay unchanged until the run returns.
         */
        @JvmStatic
        fun of(buffer: ByteBuffer, dtype: DType, vararg shape: Long): Tensor {
            require(buffer.isDirect) { "the ByteBuffer is not direct (use ByteBuffer.allocateDirect)" }
            // A direct buffer starts big-endian: values written through it in that order would be
            // read as other numbers, so only the platform's own order is taken.
            require(buffer.order() == ByteOrder.nativeOrder()) {
                "the ByteBuffer is ${buffer.order()}: set .order(ByteOrder.nativeOrder()) before writing it"
            }
            require(buffer.remaining() % dtype.byteSize == 0) {
                "${buffer.remaining()} bytes are not a whole number of $dtype elements"
            }
            return checked(dtype, shape, (buffer.remaining() / dtype.byteSize).toLong(), buffer.slice())
        }

        internal fun fromNative(dtype: Int, shape: LongArray, data: Any) = Tensor(DType.of(dtype), shape, data)
    }
}
