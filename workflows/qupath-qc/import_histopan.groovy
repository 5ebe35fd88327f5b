/*
 * Import histopan GeoJSON exports into every image of the open QuPath project.
 *
 * For each image of the project, looks in FOLDER for <image name without extension>.geojson or
 * .geojson.gz (as written by `histopan export qupath STORE -o FOLDER/<slide stem>.geojson.gz`), adds its
 * objects (nuclei as detections or cells, tissue regions as annotations) and saves the image data.
 * Images that already have detections are skipped unless REPLACE is true (then all objects are removed first).
 *
 * Run in QuPath (0.4 or newer): Automate > Script editor, open this file, Run (not "Run for project":
 * the script loops over the project itself).  Written for QuPath 0.4 / 0.5; not run by histopan's CI
 * (see README.md beside this file).
 */
import qupath.lib.common.GeneralTools
import qupath.lib.io.PathIO

// -- settings -------------------------------------------------------------------------------------------
def FOLDER = buildFilePath(PROJECT_BASE_DIR, 'histopan')   // folder with the .geojson(.gz) files
def REPLACE = false                                          // remove existing objects before importing
// --------------------------------------------------------------------------------------------------------

def project = getProject()
if (project == null) {
    println 'Open a QuPath project first (File > Open project).'
    return
}
def folder = new File(FOLDER)
if (!folder.isDirectory()) {
    println "No folder ${folder}: set FOLDER at the top of this script."
    return
}
int nImages = 0
for (entry in project.getImageList()) {
    def base = GeneralTools.stripExtension(entry.getImageName())
    def file = ['.geojson.gz', '.geojson'].collect { new File(folder, base + it) }.find { it.isFile() }
    if (file == null) {
        println "${entry.getImageName()}: no ${base}.geojson(.gz) in ${folder}, skipped"
        continue
    }
    def imageData = entry.readImageData()
    def hierarchy = imageData.getHierarchy()
    if (!hierarchy.getDetectionObjects().isEmpty()) {
        if (!REPLACE) {
            println "${entry.getImageName()}: already has detections, skipped (set REPLACE = true to replace them)"
            continue
        }
        hierarchy.clearAll()
    }
    def objects = PathIO.readObjects(file.toPath())
    hierarchy.addObjects(objects)
    // put nuclei inside the tissue-region annotations that contain them (slow for millions of nuclei;
    // comment out if you do not need the parent/child relation)
    hierarchy.resolveHierarchy()
    entry.saveImageData(imageData)
    nImages++
    println "${entry.getImageName()}: imported ${objects.size()} objects from ${file.getName()}"
}
println "Done: ${nImages} image(s) updated."
