package dev.acorn

/**
 * The JNI functions of `libacorn_jni` (android/jni): one per C ABI call, with handles as Longs.
 * The library is loaded from the `acorn.library` system property when set (a path, as the JVM
 * tests do), else by name (`System.loadLibrary("acorn_jni")`, as an Android app does from its
 * `jniLibs/<abi>/libacorn_jni.so`).
 */
internal object Native {
    init {
        val path = System.getProperty("acorn.library")
        if (path != null) System.load(path) else System.loadLibrary("acorn_jni")
    }

    @JvmStatic external fun version(): String

    @JvmStatic external fun modelOpen(path: String): Long
    @JvmStatic external fun modelOpenBytes(bytes: ByteArray): Long
    @JvmStatic external fun modelOpenFd(fd: Int, offset: Long, length: Long): Long
    @JvmStatic external fun modelFree(model: Long)
    @JvmStatic external fun ioCount(model: Long, outputs: Boolean): Int
    @JvmStatic external fun ioName(model: Long, outputs: Boolean, index: Int): String
    @JvmStatic external fun ioDtype(model: Long, outputs: Boolean, index: Int): Int
    @JvmStatic external fun ioShape(model: Long, outputs: Boolean, index: Int): LongArray?

    @JvmStatic external fun sessionNew(model: Long, threads: Int): Long
    @JvmStatic external fun sessionFree(session: Long)
    @JvmStatic external fun sessionRun(
        session: Long,
        names: Array<String>,
        dtypes: IntArray,
        shapes: Array<LongArray>,
        data: Array<Any>
    )
    @JvmStatic external fun outputCount(session: Long): Int
    @JvmStatic external fun outputName(session: Long, index: Int): String
    @JvmStatic external fun outputDtype(session: Long, index: Int): Int
    @JvmStatic external fun outputShape(session: Long, index: Int): LongArray
    @JvmStatic external fun outputData(session: Long, index: Int): Any

    @JvmStatic external fun generatorNew(model: Long, threads: Int, maxContext: Int): Long
    @JvmStatic external fun generatorFree(generator: Long)
    @JvmStatic external fun generatorReset(generator: Long)
    @JvmStatic external fun generatorCancel(generator: Long)
    @JvmStatic external fun generate(
        generator: Long,
        prompt: String?,
        tokens: IntArray?,
        maxTokens: Int,
        temperature: Float,
        topK: Int,
        topP: Float,
        seed: Long,
        decoding: Int,
        exitLayer: Int,
        draftTokens: Int,
        exitThreshold: Float,
        listener: TokenListener?
    ): DoubleArray

    @JvmStatic external fun classifierNew(model: Long, threads: Int): Long
    @JvmStatic external fun classifierFree(classifier: Long)
    @JvmStatic external fun classifierLabels(classifier: Long): Array<String>
    @JvmStatic external fun classifierSetExits(classifier: Long, on: Boolean)
    @JvmStatic external fun classifierSetThresholds(classifier: Long, thresholds: FloatArray?)
    /** Four floats per utterance: label index, score, exit layer, layers. */
    @JvmStatic external fun classify(classifier: Long, texts: Array<String>?): FloatArray

    @JvmStatic external fun embedderNew(model: Long, threads: Int): Long
    @JvmStatic external fun embedderFree(embedder: Long)
    @JvmStatic external fun embed(embedder: Long, text: String?): FloatArray

    @JvmStatic external fun trainerNew(): Long
    @JvmStatic external fun trainerFree(trainer: Long)
    @JvmStatic external fun trainerAdd(trainer: Long, label: String?, embedding: FloatArray?)
    @JvmStatic external fun trainerFit(trainer: Long, kind: Int): Long
    @JvmStatic external fun headFree(head: Long)
    @JvmStatic external fun headLabels(head: Long): Array<String>
    /** `[label index or -1, score]`. */
    @JvmStatic external fun headPredict(head: Long, embedding: FloatArray?, unknownThreshold: Float): FloatArray
    @JvmStatic external fun headSave(head: Long, model: Long, path: String?)
    @JvmStatic external fun headLoad(model: Long, path: String?): Long

    /** Panics inside the C library; only in a library built with the `panic-test` feature. */
    @JvmStatic external fun debugPanic()
    /** Panics inside the JNI layer; only in a library built with the `panic-test` feature. */
    @JvmStatic external fun debugJniPanic()
}
